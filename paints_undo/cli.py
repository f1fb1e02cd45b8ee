"""Command line: ``python -m paints_undo IMAGE [IMAGE ...] -o OUT``.

Every setting of the app is a flag with the original's defaults. Each image gets a folder under
``OUT`` holding its keyframes (PNG), finished video segments and the exported files; a rerun with
the same settings resumes where an interrupted run stopped. Errors print one line and exit non-zero.

``--sketch`` switches to sketch mode: per image, the line art of the chosen detectors
(``lineart/<detector>.png``), keyframes at sketch-stage steps for several seeds ranked against it
(``sketches/rank_00_seed<S>_step<T>.png``, closest first) and ``sketches.json``; no video.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
import threading
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .errors import Cancelled, ModelLoadError, ModelsNotAvailableError, PaintsUndoError
from .images import ImageLoadError
from .keyframes import (
    DEFAULT_CFG,
    DEFAULT_HEIGHT,
    DEFAULT_NEGATIVE_PROMPT,
    DEFAULT_SEED,
    DEFAULT_STEPS,
    DEFAULT_UNDO_STEPS,
    DEFAULT_WIDTH,
)
from .models import MODELS_DIR_ENV, ModelManager, ModelSources
from .progress import ProgressEvent
from .sketch import DEFAULT_DETECTORS, DEFAULT_SKETCH_SETS, DEFAULT_SKETCH_STEPS, DETECTORS
from .video import (
    DEFAULT_FPS,
    DEFAULT_VIDEO_CFG,
    DEFAULT_VIDEO_PROMPT,
    DEFAULT_VIDEO_SEED,
    DEFAULT_VIDEO_STEPS,
    VideoSegment,
    parse_buckets,
)

logger = logging.getLogger("paints_undo")

BUCKETS_ENV = "PAINTS_UNDO_VIDEO_BUCKETS"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
EXPORT_FORMATS = ("mp4", "webm", "gif", "zip")


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_speed_arguments(group) -> None:
    """The speed switches the CLI and the app share; none of them changes the math."""
    group.add_argument("--batch-cfg", action=argparse.BooleanOptionalAction, default=None,
                       help="both guidance branches in one UNet batch (default: on with a GPU, off on CPU and in "
                            "low-VRAM mode below 7 GiB free; --no-batch-cfg reproduces the original's two calls "
                            "exactly)")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the UNets (about 1.3x faster video sampling on an H100 after ~3 minutes "
                            "of warm-up)")
    group.add_argument("--cuda-graphs", action="store_true",
                       help="replay the video UNet as a CUDA graph (CUDA, high-VRAM mode; exact, for hosts where "
                            "kernel launches are the bottleneck: no gain on an H100)")
    group.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                       help="run the video UNet channels-last: the same math without cuDNN's layout transposes "
                            "around each convolution (default: on with a CUDA GPU from Volta on, 9%% faster per "
                            "step on an H100)")
    group.add_argument("--segment-batch", type=positive_int, default=None, metavar="N",
                       help="sample at most N video segments as one batch in high-VRAM mode (the same math per "
                            "segment; about 2.2 GiB more per segment; segments then appear N at a time; default: "
                            "as many as the free GPU memory holds, 13%% faster per segment with 7 on an H100; "
                            "1 = one at a time)")
    group.add_argument("--fused-kernels", action="store_true",
                       help="run the video UNet's channels-last group norms (with the SiLU after them) and "
                            "feed-forward gates as one-pass Triton kernels (needs Triton and a CUDA GPU from Ampere on; "
                            "off by default until timed on a GPU; results differ by about one fp16 rounding)")


def model_manager_from_args(args: argparse.Namespace) -> ModelManager:
    """The model cache both front ends build from their flags (``--models-dir``, ``--device``, VRAM
    mode and the speed switches)."""
    return ModelManager(sources=ModelSources.from_env(args.models_dir), device=args.device,
                        vram_mode=args.vram_mode, batch_cfg=args.batch_cfg, compile=args.compile,
                        cuda_graphs=args.cuda_graphs, channels_last=args.channels_last,
                        segment_batch=args.segment_batch, fused_kernels=args.fused_kernels)


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in re.split(r"[,\s]+", text.strip()) if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a list of whole numbers") from None


def _formats(text: str) -> list[str]:
    items = [v.strip().lower() for v in text.split(",") if v.strip()]
    bad = [v for v in items if v not in EXPORT_FORMATS]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"formats must be among {', '.join(EXPORT_FORMATS)}")
    return items


def _detector_list(text: str) -> list[str]:
    from .sketch import validate_detectors

    try:
        return validate_detectors(text)
    except PaintsUndoError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m paints_undo",
        description="Play an illustration's drawing process backwards: keyframes, then a video (blank canvas first).",
    )
    p.add_argument("images", nargs="*", help="image files or folders of images")
    p.add_argument("-o", "--output", default="results", help="output folder (default: %(default)s)")

    g = p.add_argument_group("step 1: prompt")
    g.add_argument("--prompt", default=None, help="keyframe prompt (default: generated by the WD14 tagger)")
    g.add_argument("--tag-threshold", type=float, default=0.35)
    g.add_argument("--character-threshold", type=float, default=0.85)
    g.add_argument("--exclude-tags", default="")

    g = p.add_argument_group("step 2: key frames")
    g.add_argument("--undo-steps", type=_int_list, default=list(DEFAULT_UNDO_STEPS),
                   help="operation steps 0..999, e.g. '400,600,800,900,950,999' (default)")
    g.add_argument("--seed", type=int, default=DEFAULT_SEED)
    g.add_argument("--width", type=int, default=DEFAULT_WIDTH)
    g.add_argument("--height", type=int, default=DEFAULT_HEIGHT)
    g.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    g.add_argument("--cfg", type=float, default=DEFAULT_CFG)
    g.add_argument("--negative-prompt", default=DEFAULT_NEGATIVE_PROMPT)
    g.add_argument("--long-prompt", action="store_true", help="encode prompts over 75 tokens in chunks (opt-in)")
    g.add_argument("--keyframes-only", action="store_true", help="stop after the key frames")
    g.add_argument("--keyframes", nargs="+", metavar="KEYFRAME", default=None,
                   help="interpolate these keyframes (in drawing-undo order: finished picture first) instead of "
                        "generating them; a single folder is read in sorted order")

    g = p.add_argument_group("step 3: video")
    g.add_argument("--video-prompt", default=DEFAULT_VIDEO_PROMPT)
    g.add_argument("--video-seed", type=int, default=DEFAULT_VIDEO_SEED)
    g.add_argument("--video-cfg", type=float, default=DEFAULT_VIDEO_CFG)
    g.add_argument("--video-steps", type=int, default=DEFAULT_VIDEO_STEPS)
    g.add_argument("--fps", type=int, default=DEFAULT_FPS)
    g.add_argument("--video-buckets", default=os.environ.get(BUCKETS_ENV),
                   help=f"HEIGHTxWIDTH list (default: the original's 320x512,384x448,448x384,512x320; env {BUCKETS_ENV})")
    g.add_argument("--formats", type=_formats, default=["mp4"], help="mp4,webm,gif,zip (default: mp4)")

    g = p.add_argument_group("sketch mode (line art and ranked sketches instead of a video)")
    g.add_argument("--sketch", action="store_true",
                   help="write line art, sketch candidates ranked by distance to it, and sketches.json; no video")
    g.add_argument("--sketch-steps", type=_int_list, default=list(DEFAULT_SKETCH_STEPS),
                   help="operation steps of the sketch candidates (default: "
                        f"{','.join(map(str, DEFAULT_SKETCH_STEPS))})")
    g.add_argument("--sketch-sets", type=int, default=DEFAULT_SKETCH_SETS,
                   help="candidate sets, one seed each from --seed on (default: %(default)s)")
    g.add_argument("--detectors", type=_detector_list, default=list(DEFAULT_DETECTORS),
                   help=f"line-art detectors among {','.join(DETECTORS)} (default: {','.join(DEFAULT_DETECTORS)})")

    g = p.add_argument_group("models and memory")
    g.add_argument("--models-dir", default=None, help=f"folder with the model folders (env {MODELS_DIR_ENV})")
    g.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    vram = g.add_mutually_exclusive_group()
    vram.add_argument("--vram-mode", choices=("high", "normal", "low"), default=None)
    vram.add_argument("--high-vram", dest="vram_mode", action="store_const", const="high")
    vram.add_argument("--low-vram", dest="vram_mode", action="store_const", const="low")
    add_speed_arguments(g)

    g = p.add_argument_group("run")
    g.add_argument("--no-resume", action="store_true", help="recompute everything even if cached results exist")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    g.add_argument("-v", "--verbose", action="store_true")
    return p


# -- inputs ----------------------------------------------------------------------------------------


def expand_inputs(paths: Sequence[str]) -> list[Path]:
    """Files as given, folders expanded to their images (sorted); missing paths are an error."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            out.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()))
        elif path.is_file():
            out.append(path)
        else:
            raise PaintsUndoError(f"Input '{raw}' does not exist.")
    return out


def _job_names(images: Sequence[Path]) -> list[str]:
    names: list[str] = []
    for img in images:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", img.stem) or "image"
        name, n = base, 2
        while name in names:
            name, n = f"{base}_{n}", n + 1
        names.append(name)
    return names


def _digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- stage cache (resume) ----------------------------------------------------------------------------


class JobFolder:
    """One input's working folder: keyframes and finished segments are cached here for resume."""

    def __init__(self, root: Path, resume: bool):
        self.root = root
        self.resume = resume
        root.mkdir(parents=True, exist_ok=True)

    def _state_path(self, stage: str) -> Path:
        return self.root / f".{stage}.json"

    def cached(self, stage: str, digest: str) -> bool:
        if not self.resume:
            return False
        try:
            return json.loads(self._state_path(stage).read_text()).get("digest") == digest
        except (OSError, ValueError):
            return False

    def mark(self, stage: str, digest: str, **extra: Any) -> None:
        tmp = self._state_path(stage).with_suffix(".tmp")
        tmp.write_text(json.dumps({"digest": digest, **extra}))
        os.replace(tmp, self._state_path(stage))

    def keyframe_paths(self, count: int) -> list[Path]:
        return [self.root / "keyframes" / f"keyframe_{i:02d}.png" for i in range(count)]

    def segment_path(self, index: int) -> Path:
        return self.root / "segments" / f"segment_{index:03d}.npz"


def _save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(array).save(tmp)
    os.replace(tmp, path)


def _load_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


# -- progress ----------------------------------------------------------------------------------------


class _Bars:
    """tqdm bars per stage (one per video segment), driven by ``ProgressEvent``s."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar = None
        self.key = None

    def __call__(self, event: ProgressEvent) -> None:
        if self.quiet:
            return
        from tqdm.auto import tqdm

        key = (event.stage, event.segment)
        if key != self.key:
            self.close()
            self.key = key
            self.bar = tqdm(total=event.total, desc=event.description.split(":")[0], unit="step", leave=False)
        self.bar.n = event.step
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            self.key = None


# -- one job ----------------------------------------------------------------------------------------


def _keyframe_settings(args, prompt: str) -> dict:
    return dict(prompt=prompt, undo_steps=list(args.undo_steps), width=args.width, height=args.height, seed=args.seed,
                steps=args.steps, negative_prompt=args.negative_prompt, cfg=args.cfg, long_prompt=args.long_prompt)


def _video_settings(args, buckets) -> dict:
    return dict(prompt=args.video_prompt, steps=args.video_steps, cfg=args.video_cfg, seed=args.video_seed,
                buckets=[list(b) for b in buckets])


def _prompt(args, models: ModelManager, job: JobFolder, name: str, image: Path) -> str:
    """``--prompt``, else the tagger's (kept in ``prompt.txt`` for resumed runs)."""
    prompt = args.prompt
    if prompt is None:
        prompt_file = job.root / "prompt.txt"
        if job.resume and prompt_file.is_file():
            prompt = prompt_file.read_text(encoding="utf-8")
        else:
            prompt = models.tag(str(image), threshold=args.tag_threshold,
                                character_threshold=args.character_threshold, exclude_tags=args.exclude_tags)
            prompt_file.write_text(prompt, encoding="utf-8")
        logger.info("%s: prompt '%s'", name, prompt)
    return prompt


def _sketch_files_complete(json_path: Path) -> bool:
    """Whether ``sketches.json`` and every picture it lists are still there."""
    try:
        doc = json.loads(json_path.read_text(encoding="utf-8"))
        files = [s["file"] for s in doc["sketches"]] + list(doc["line_art"].values())
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all((json_path.parent / f).is_file() for f in files)


def run_sketch_job(args, models: ModelManager, name: str, image: Path, cancel: threading.Event,
                   bars: _Bars) -> dict[str, Path]:
    """Sketch mode for one image: line art, ranked sketch candidates and ``sketches.json`` (reused if unchanged)."""
    from .sketch import generate_sketches, save_sketch_result

    job = JobFolder(Path(args.output) / name, resume=not args.no_resume)
    prompt = _prompt(args, models, job, name, image)
    settings = dict(prompt=prompt, sketch_steps=list(args.sketch_steps), num_sets=args.sketch_sets, seed=args.seed,
                    width=args.width, height=args.height, steps=args.steps, negative_prompt=args.negative_prompt,
                    cfg=args.cfg, detectors=list(args.detectors))
    digest = _digest({**settings, "image": _file_digest(image)})
    outputs = {"lineart": job.root / "lineart", "sketches": job.root / "sketches", "json": job.root / "sketches.json"}
    if job.cached("sketches", digest) and _sketch_files_complete(outputs["json"]):
        logger.info("%s: reusing cached sketches", name)
        return outputs
    result = generate_sketches(str(image), models=models, progress=bars, cancel=cancel, **settings)
    bars.close()
    extra = dict(input=str(image), models=_origins(models), device=str(models.memory.device),
                 vram_mode=models.memory.vram_mode)
    outputs = save_sketch_result(result, job.root, extra)
    job.mark("sketches", digest)
    return outputs


def run_job(args, models: ModelManager, name: str, image: Optional[Path], user_keyframes: Optional[list[Path]],
            buckets, cancel: threading.Event, bars: _Bars) -> dict[str, Path]:
    from . import export
    from .keyframes import generate_keyframes
    from .video import assemble_video, iter_video_segments, load_keyframe

    job = JobFolder(Path(args.output) / name, resume=not args.no_resume)
    settings: dict[str, Any] = {"input": str(image) if image else None}

    if user_keyframes is not None:
        keyframes = [load_keyframe(p) for p in user_keyframes]
        settings["keyframes"] = [str(p) for p in user_keyframes]
    else:
        prompt = _prompt(args, models, job, name, image)
        kf_settings = _keyframe_settings(args, prompt)
        settings["keyframes"] = kf_settings
        digest = _digest({**kf_settings, "image": _file_digest(image)})
        paths = job.keyframe_paths(len(args.undo_steps) + 2)
        if job.cached("keyframes", digest) and all(p.is_file() for p in paths):
            logger.info("%s: reusing cached key frames", name)
            keyframes = [_load_png(p) for p in paths]
        else:
            keyframes = generate_keyframes(str(image), models=models, progress=bars, cancel=cancel, **kf_settings)
            bars.close()
            for frame, path in zip(keyframes, paths):
                _save_png(frame, path)
            job.mark("keyframes", digest)
        if args.keyframes_only:
            return {"keyframes": job.root / "keyframes"}

    video_settings = _video_settings(args, buckets)
    settings["video"] = video_settings
    digest = _digest({**video_settings, "keyframes": [hashlib.sha256(k.tobytes()).hexdigest() for k in keyframes]})
    count = len(keyframes) - 1
    segments: list[VideoSegment] = []
    if job.cached("video", digest):
        for i in range(count):
            path = job.segment_path(i)
            if path.is_file():
                with np.load(path) as data:
                    segments.append(VideoSegment(i, count, data["frames"], (data["crop_1"], data["crop_2"]),
                                                 tuple(data["bucket"])))
        if segments:
            logger.info("%s: reusing %d of %d cached video segments", name, len(segments), count)
    else:
        # Segments of other settings must never be mixed into this video.
        for stale in job.root.glob("segments/segment_*.npz"):
            stale.unlink()
        job.mark("video", digest)
    done = {s.index for s in segments}
    for segment in iter_video_segments(keyframes, video_settings["prompt"], video_settings["steps"],
                                       video_settings["cfg"], video_settings["seed"], buckets=buckets, models=models,
                                       progress=bars, cancel=cancel, skip=done):
        path = job.segment_path(segment.index)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, frames=segment.frames, crop_1=segment.cropped[0], crop_2=segment.cropped[1],
                 bucket=np.array(segment.bucket))
        os.replace(tmp, path)
        segments.append(segment)
    bars.close()
    frames = assemble_video(segments)

    settings.update(fps=args.fps, models=_origins(models), device=str(models.memory.device),
                    vram_mode=models.memory.vram_mode)
    return export.export_all(frames, job.root, stem=name, fps=args.fps, formats=args.formats, settings=settings,
                             overwrite=True)


def _file_digest(path: Optional[Path]) -> Optional[str]:
    if path is None:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _origins(models: ModelManager) -> dict:
    out = {}
    for family, loaded in (("single_frame", models._single), ("multi_frame", models._multi)):
        if loaded is not None:
            out[family] = {"repo": loaded.origin.repo, "revision": loaded.origin.revision}
    return out


# -- entry point --------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "huggingface_hub", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    try:
        buckets = parse_buckets(args.video_buckets)
        images = expand_inputs(args.images)
        user_keyframes = None
        if args.keyframes is not None:
            user_keyframes = expand_inputs(args.keyframes)
            if len(user_keyframes) < 2:
                raise PaintsUndoError("--keyframes needs at least two images (or a folder holding them).")
        elif not images:
            parser.print_usage(sys.stderr)
            raise PaintsUndoError("Give at least one image (or --keyframes).")
        if args.sketch:
            from .keyframes import validate_keyframe_settings
            from .sketch import validate_sketch_settings

            if args.keyframes is not None:
                raise PaintsUndoError("--sketch works on images, not on --keyframes.")
            args.sketch_steps, args.sketch_sets, args.detectors = validate_sketch_settings(
                args.sketch_steps, args.sketch_sets, args.detectors)
            validate_keyframe_settings(args.sketch_steps, args.width, args.height, args.steps, args.cfg, args.seed)
    except (PaintsUndoError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    models = model_manager_from_args(args)
    cancel = threading.Event()
    bars = _Bars(args.quiet)
    jobs = [(n, img, None) for n, img in zip(_job_names(images), images)]
    if user_keyframes is not None:
        jobs = [(_job_names([user_keyframes[0]])[0] + "_keyframes", None, user_keyframes)]

    failures = 0
    for name, image, kfs in jobs:
        try:
            if args.sketch:
                outputs = run_sketch_job(args, models, name, image, cancel, bars)
            else:
                outputs = run_job(args, models, name, image, kfs, buckets, cancel, bars)
            for kind, path in outputs.items():
                print(f"{name}: {kind} -> {path}")
        except KeyboardInterrupt:
            cancel.set()
            bars.close()
            print("error: interrupted; rerun the same command to resume.", file=sys.stderr)
            return 130
        except Cancelled:
            bars.close()
            print("error: stopped; rerun the same command to resume.", file=sys.stderr)
            return 130
        except (PaintsUndoError, ImageLoadError, ValueError, OSError) as exc:
            bars.close()
            failures += 1
            print(f"error: {name}: {exc}", file=sys.stderr)
            if isinstance(exc, (ModelsNotAvailableError, ModelLoadError)):
                return 1  # every other job would fail the same way
        except Exception as exc:  # a bug: still one line, details with --verbose
            bars.close()
            failures += 1
            logger.debug("Unexpected error", exc_info=True)
            print(f"error: {name}: unexpected {type(exc).__name__}: {exc} (rerun with --verbose for details)",
                  file=sys.stderr)
    return 1 if failures else 0
