"""Paints-UNDO in the browser: the original's three steps as a thin UI over ``paints_undo``.

The first tab is the original's three-step drawing-process UI; the "Sketch & line art" tab extracts
line art and ranks sketch-stage keyframes against it (``paints_undo.sketch``).
Run ``python gradio_app.py`` (serves on http://127.0.0.1:7860). No model is loaded at import or at
start-up: each model family loads on first use, and the page says which models are missing and how
to provide them. All GPU work goes through one queue (one job at a time); Stop buttons end a run
between two sampler steps; validation problems are shown as messages, never tracebacks.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import gradio as gr
import numpy as np

import paints_undo
from paints_undo import export
from paints_undo.cli import add_speed_arguments, model_manager_from_args
from paints_undo.errors import Cancelled, PaintsUndoError
from paints_undo.keyframes import (
    DEFAULT_CFG,
    DEFAULT_HEIGHT,
    DEFAULT_NEGATIVE_PROMPT,
    DEFAULT_SEED,
    DEFAULT_STEPS,
    DEFAULT_UNDO_STEPS,
    DEFAULT_WIDTH,
)
from paints_undo.models import ModelManager
from paints_undo.progress import ProgressEvent
from paints_undo.sketch import (
    DEFAULT_DETECTORS,
    DEFAULT_SKETCH_SETS,
    DEFAULT_SKETCH_STEPS,
    DETECTORS,
    extract_lineart,
    generate_sketches,
    save_line_art,
    save_sketch_result,
    sketch_caption,
)
from paints_undo.video import (
    DEFAULT_FPS,
    DEFAULT_VIDEO_CFG,
    DEFAULT_VIDEO_PROMPT,
    DEFAULT_VIDEO_SEED,
    DEFAULT_VIDEO_STEPS,
    assemble_video,
    parse_buckets,
)

logger = logging.getLogger("gradio_app")

ROOT = Path(__file__).resolve().parent
BUCKETS_ENV = "PAINTS_UNDO_VIDEO_BUCKETS"
AUTH_ENV = "PAINTS_UNDO_AUTH"
EXAMPLES = [[str(ROOT / "imgs" / "1.png"), 12345, 123], [str(ROOT / "imgs" / "2.png"), 37000, 12345],
            [str(ROOT / "imgs" / "3.png"), 3000, 3000]]


# -- configuration ----------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Paints-UNDO web app")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    p.add_argument("--share", action="store_true", help="create a public gradio.live link (needs internet)")
    p.add_argument("--auth", default=os.environ.get(AUTH_ENV), help=f"USER:PASSWORD login (env {AUTH_ENV})")
    p.add_argument("--video-buckets", default=os.environ.get(BUCKETS_ENV),
                   help=f"video sizes HEIGHTxWIDTH,... (default: the original's four; env {BUCKETS_ENV})")
    p.add_argument("--models-dir", default=None, help="folder holding paints_undo_single_frame/ and paints_undo_multi_frame/")
    p.add_argument("--results-dir", default=os.environ.get("PAINTS_UNDO_RESULTS_DIR", str(ROOT / "results")))
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    vram = p.add_mutually_exclusive_group()
    vram.add_argument("--high-vram", dest="vram_mode", action="store_const", const="high")
    vram.add_argument("--low-vram", dest="vram_mode", action="store_const", const="low")
    add_speed_arguments(p)
    p.add_argument("--max-queue", type=int, default=16, help="waiting jobs before new ones are refused")
    return p.parse_args(argv)


def parse_auth(text: Optional[str]) -> Optional[tuple[str, str]]:
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ValueError("--auth must be USER:PASSWORD.")
    return user, password


@dataclass
class Services:
    """What the UI calls: the model cache, settings and the per-session stop flags."""

    models: ModelManager
    buckets: tuple[tuple[int, int], ...]
    results_dir: Path
    _stops: dict[str, threading.Event] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def stop_flag(self, request: Optional[gr.Request]) -> threading.Event:
        key = getattr(request, "session_hash", None) or "default"
        with self._lock:
            return self._stops.setdefault(key, threading.Event())

    def begin_run(self, request: Optional[gr.Request]) -> threading.Event:
        """The session's stop flag, cleared for a new run (a Stop pressed earlier must not end it)."""
        stop = self.stop_flag(request)
        stop.clear()
        return stop


# -- helpers -----------------------------------------------------------------------------------------


def upload_path(payload: Any) -> Optional[str]:
    """Path of an uploaded image as the image events receive it (``preprocess=False``).

    Image events skip Gradio's own decoding, so a broken upload reaches our loader, which answers
    with one readable sentence instead of a component-processing error.
    """
    if payload is None or isinstance(payload, str):
        return payload
    if isinstance(payload, dict):
        return payload.get("path")
    return getattr(payload, "path", None)


def required_upload(payload: Any) -> str:
    """The uploaded image's path, or a message asking for one."""
    path = upload_path(payload)
    if not path:
        raise user_message("Upload an image first.")
    return path


def user_message(message: str, title: str = "Error") -> gr.Error:
    """A message for the page; the server log gets no traceback for it (it is not a bug)."""
    return gr.Error(message, title=title, print_exception=False)


def user_errors(fn: Callable) -> Callable:
    """Show our errors as messages and never a traceback; log unexpected ones for the operator."""

    def report(exc: BaseException) -> gr.Error:
        if isinstance(exc, Cancelled):
            return user_message("Stopped.", title="Stopped")
        if isinstance(exc, (PaintsUndoError, ValueError, FileNotFoundError)):
            return user_message(str(exc))
        logger.exception("Unexpected error in %s", fn.__name__)
        return user_message(f"Unexpected error ({type(exc).__name__}); the server keeps running and logged the details.")

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as exc:
                raise report(exc) from None

        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as exc:
            raise report(exc) from None

    return wrapper


def run_in_worker(work: Callable[[Callable[[ProgressEvent], None], threading.Event], Any], stop: threading.Event,
                  progress: Optional[gr.Progress]) -> Iterator[tuple[str, Any]]:
    """Run ``work(progress_cb, stop)`` in a thread; yield ('progress', event) / ('item', x) / ('done', result).

    If the consumer goes away (Stop, closed tab), ``stop`` is set and the worker ends at its next
    sampler step instead of holding the GPU.
    """
    import queue

    events: "queue.Queue[tuple[str, Any]]" = queue.Queue()

    def on_progress(event: ProgressEvent) -> None:
        events.put(("progress", event))

    def target() -> None:
        try:
            result = work(on_progress, stop)
            if hasattr(result, "__next__"):
                for item in result:
                    events.put(("item", item))
                events.put(("done", None))
            else:
                events.put(("done", result))
        except BaseException as exc:  # handed to the consumer, raised there
            events.put(("error", exc))

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        while True:
            kind, value = events.get()
            if kind == "progress":
                if progress is not None and value.total:
                    progress((value.step, value.total), desc=value.description)
                continue
            if kind == "error":
                raise value
            yield kind, value
            if kind == "done":
                return
    finally:
        if thread.is_alive():
            stop.set()


def _keyframe_sources(gallery: Any, uploads: Any) -> list[Any]:
    """Keyframes for step 3: the user's uploaded files if any, else the step-2 gallery."""
    if uploads:
        files = uploads if isinstance(uploads, list) else [uploads]
        return [getattr(f, "name", f) for f in files]
    return list(gallery or [])


def _gray_to_rgb(line: np.ndarray) -> np.ndarray:
    return np.repeat(line[:, :, None], 3, axis=2) if line.ndim == 2 else line


def _zip_folder(folder: Path, target: Path) -> Path:
    """``target``: every file under ``folder`` (paths relative to it); PNGs are stored, not deflated."""
    import zipfile

    tmp = target.with_name(f".{target.name}.part")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                kind = zipfile.ZIP_STORED if path.suffix == ".png" else zipfile.ZIP_DEFLATED
                archive.write(path, path.relative_to(folder).as_posix(), compress_type=kind)
    os.replace(tmp, target)
    return target


# -- event handlers -----------------------------------------------------------------------------------


def make_handlers(services: Services) -> dict[str, Callable]:
    @user_errors
    def tag(image: Any) -> str:
        return services.models.tag(required_upload(image))

    @user_errors
    def keyframes(image, prompt, undo_steps, seed, width, height, steps, n_prompt, cfg,
                  request: gr.Request = None, progress=gr.Progress()):
        image = required_upload(image)
        stop = services.begin_run(request)

        def work(on_progress, stop_event):
            return paints_undo.generate_keyframes(
                image, prompt or "", list(undo_steps or []), width, height, seed, steps,
                n_prompt or "", cfg, models=services.models, progress=on_progress, cancel=stop_event)

        for kind, frames in run_in_worker(work, stop, progress):
            if kind == "done":
                yield [(f, f"key frame {i}") for i, f in enumerate(frames)]

    @user_errors
    def video(gallery, uploads, prompt, steps, cfg, fps, seed, request: gr.Request = None, progress=gr.Progress()):
        sources = _keyframe_sources(gallery, uploads)
        if len(sources) < 2:
            raise user_message("Generate key frames first (Step 2) or upload at least two key frames.")
        fps = int(fps)
        if fps < 1:
            raise user_message("FPS must be at least 1.")
        stop = services.begin_run(request)
        stem = export.unique_output_stem()
        services.results_dir.mkdir(parents=True, exist_ok=True)
        segments: list = []

        def work(on_progress, stop_event):
            return paints_undo.iter_video_segments(sources, prompt or "", steps, cfg, seed, buckets=services.buckets,
                                                   models=services.models, progress=on_progress, cancel=stop_event)

        previews: list[Path] = []
        for kind, segment in run_in_worker(work, stop, progress):
            if kind == "item":
                segments.append(segment)
                partial = assemble_video(segments)
                preview = services.results_dir / f"{stem}_preview{len(segments)}.mp4"
                export.write_mp4(partial, preview, fps=fps)
                previews.append(preview)
                # The frame gallery is filled once, at the end: Gradio rewrites the cached image of
                # every frame it is given again (in place, not atomically), so re-sending earlier
                # frames with each preview races with the browser still fetching them.
                yield str(preview), gr.skip(), None
        frames = assemble_video(segments)
        settings = dict(prompt=prompt, steps=int(steps), cfg=float(cfg), seed=int(seed), fps=fps,
                        buckets=[list(b) for b in services.buckets], keyframes=len(sources),
                        device=str(services.models.memory.device), vram_mode=services.models.memory.vram_mode)
        outputs = export.export_all(frames, services.results_dir, stem=stem, fps=fps, formats=("mp4", "zip"),
                                    settings=settings)
        for p in previews:
            p.unlink(missing_ok=True)
        files = [str(outputs[k]) for k in ("mp4", "zip", "json") if k in outputs]
        yield str(outputs["mp4"]), [(f, None) for f in frames], files

    def _sketch_folder(prefix: str) -> Path:
        stem = export.unique_output_stem(prefix)
        folder = services.results_dir / stem
        folder.mkdir(parents=True)
        return folder

    @user_errors
    def lineart(image, detectors, request: gr.Request = None, progress=gr.Progress()):
        image = required_upload(image)
        stop = services.begin_run(request)

        def work(on_progress, stop_event):
            return extract_lineart(image, list(detectors or []), models=services.models, progress=on_progress,
                                   cancel=stop_event)

        for kind, maps in run_in_worker(work, stop, progress):
            if kind == "done":
                folder = _sketch_folder("lineart")
                save_line_art(maps, folder / "lineart")
                sizes = {name: list(line.shape[:2]) for name, line in maps.items()}
                info = dict(detectors=list(maps), sizes=sizes, device=str(services.models.memory.device))
                json_path = export.write_sidecar(folder / "lineart.json", info)
                archive = _zip_folder(folder, folder.with_suffix(".zip"))
                yield [(_gray_to_rgb(line), name) for name, line in maps.items()], [str(archive), str(json_path)]

    @user_errors
    def sketches(image, prompt, detectors, sketch_steps, sets, seed, width, height, steps, n_prompt, cfg,
                 request: gr.Request = None, progress=gr.Progress()):
        image = required_upload(image)
        stop = services.begin_run(request)

        def work(on_progress, stop_event):
            return generate_sketches(image, prompt or "", list(sketch_steps or []), sets, seed, width, height, steps,
                                     n_prompt or "", cfg, list(detectors or []), models=services.models,
                                     progress=on_progress, cancel=stop_event)

        for kind, result in run_in_worker(work, stop, progress):
            if kind == "done":
                folder = _sketch_folder("sketches")
                outputs = save_sketch_result(result, folder, dict(device=str(services.models.memory.device),
                                                                  vram_mode=services.models.memory.vram_mode))
                archive = _zip_folder(folder, folder.with_suffix(".zip"))
                line_items = [(_gray_to_rgb(line), name) for name, line in result.line_art.items()]
                sketch_items = [(sketch, sketch_caption(rank, score, origin)) for rank, (sketch, score, origin)
                                in enumerate(zip(result.sketches, result.scores, result.origins))]
                yield line_items, sketch_items, [str(archive), str(outputs["json"])]

    def stop(request: gr.Request = None) -> None:
        services.stop_flag(request).set()

    return dict(tag=tag, keyframes=keyframes, video=video, lineart=lineart, sketches=sketches, stop=stop)


# -- layout ------------------------------------------------------------------------------------------


def missing_models_markdown(models: ModelManager) -> str:
    try:
        missing = models.missing_models()
    except Exception as exc:  # never block start-up
        return f"Could not check the model files: {exc}"
    if not missing:
        return ""
    lines = ["**Some models are not available yet** (the app still runs; these steps will fail until fixed):"]
    lines += [f"- {message}" for message in missing.values()]
    return "\n".join(lines)


def keyframe_sampling_controls(
    width_id: str, height_id: str, steps_id: str, cfg_id: str, negative_prompt_id: str,
) -> tuple[gr.Slider, gr.Slider, gr.Slider, gr.Slider, gr.Textbox]:
    """The single-frame model's size, steps, CFG and negative prompt inputs (the keyframe and sketch tabs
    share their ranges and defaults; the element ids tell the tabs apart)."""
    width = gr.Slider(label="Image Width", minimum=256, maximum=1024, value=DEFAULT_WIDTH, step=64, elem_id=width_id)
    height = gr.Slider(label="Image Height", minimum=256, maximum=1024, value=DEFAULT_HEIGHT, step=64,
                       elem_id=height_id)
    steps = gr.Slider(label="Steps", minimum=1, maximum=100, value=DEFAULT_STEPS, step=1, elem_id=steps_id)
    cfg = gr.Slider(label="CFG Scale", minimum=1.0, maximum=32.0, value=DEFAULT_CFG, step=0.01, elem_id=cfg_id)
    negative_prompt = gr.Textbox(label="Negative Prompt", value=DEFAULT_NEGATIVE_PROMPT, elem_id=negative_prompt_id)
    return width, height, steps, cfg, negative_prompt


def drawing_process_tab(handlers: dict[str, Callable], gpu: dict) -> None:
    """The original's three steps (prompt, key frames, video) with their api names /tag, /keyframes, /video."""
    with gr.Accordion(label="Step 1: Upload Image and Generate Prompt", open=True):
        with gr.Row():
            with gr.Column():
                input_fg = gr.Image(sources=["upload"], type="filepath", format="png", label="Image", height=512,
                                    elem_id="input_image")
            with gr.Column():
                prompt_gen_button = gr.Button(value="Generate Prompt", interactive=False, elem_id="tag_button")
                prompt = gr.Textbox(label="Output Prompt", interactive=True, elem_id="prompt")

    with gr.Accordion(label="Step 2: Generate Key Frames", open=True):
        with gr.Row():
            with gr.Column():
                input_undo_steps = gr.Dropdown(label="Operation Steps", value=list(DEFAULT_UNDO_STEPS),
                                               choices=list(range(1000)), multiselect=True, elem_id="undo_steps")
                seed = gr.Slider(label="Stage 1 Seed", minimum=0, maximum=50000, step=1, value=DEFAULT_SEED,
                                 elem_id="seed")
                image_width, image_height, steps, cfg, n_prompt = keyframe_sampling_controls(
                    "width", "height", "steps", "cfg", "n_prompt")
            with gr.Column():
                with gr.Row():
                    key_gen_button = gr.Button(value="Generate Key Frames", interactive=False,
                                               elem_id="keyframes_button")
                    key_stop_button = gr.Button(value="Stop", variant="stop", elem_id="keyframes_stop")
                result_gallery = gr.Gallery(height=512, object_fit="contain", label="Outputs", columns=4,
                                            format="png", elem_id="keyframes_gallery")

    with gr.Accordion(label="Step 3: Generate All Videos", open=True):
        with gr.Row():
            with gr.Column():
                # As in the original: a generic prompt works better here than the tagger's.
                i2v_input_text = gr.Text(label="Prompts", value=DEFAULT_VIDEO_PROMPT, elem_id="video_prompt")
                i2v_seed = gr.Slider(label="Stage 2 Seed", minimum=0, maximum=50000, step=1,
                                     value=DEFAULT_VIDEO_SEED, elem_id="video_seed")
                i2v_cfg_scale = gr.Slider(minimum=1.0, maximum=15.0, step=0.5, label="CFG Scale",
                                          value=DEFAULT_VIDEO_CFG, elem_id="i2v_cfg_scale")
                i2v_steps = gr.Slider(minimum=1, maximum=60, step=1, elem_id="i2v_steps", label="Sampling steps",
                                      value=DEFAULT_VIDEO_STEPS)
                i2v_fps = gr.Slider(minimum=1, maximum=30, step=1, elem_id="i2v_motion", label="FPS",
                                    value=DEFAULT_FPS)
                own_keyframes = gr.File(label="Or upload your own key frames (finished picture first)",
                                        file_count="multiple", file_types=["image"], elem_id="own_keyframes")
            with gr.Column():
                with gr.Row():
                    i2v_end_btn = gr.Button("Generate Video", interactive=False, elem_id="video_button")
                    video_stop_button = gr.Button(value="Stop", variant="stop", elem_id="video_stop")
                i2v_output_video = gr.Video(label="Generated Video", elem_id="output_vid", autoplay=True, height=512)
                downloads = gr.File(label="Downloads (MP4, frames ZIP, settings JSON)", file_count="multiple",
                                    interactive=False, elem_id="downloads")
        with gr.Row():
            i2v_output_images = gr.Gallery(height=512, label="Output Frames", object_fit="contain", columns=8,
                                           format="png", elem_id="video_frames")

    # Buttons become usable step by step, as in the original.
    input_fg.change(lambda: ["", gr.update(interactive=True), gr.update(interactive=False),
                             gr.update(interactive=False)],
                    outputs=[prompt, prompt_gen_button, key_gen_button, i2v_end_btn], api_visibility="private")
    prompt_gen_button.click(fn=handlers["tag"], inputs=[input_fg], outputs=[prompt], api_name="tag", preprocess=False, **gpu).then(
        lambda: [gr.update(interactive=True), gr.update(interactive=True), gr.update(interactive=False)],
        outputs=[prompt_gen_button, key_gen_button, i2v_end_btn], api_visibility="private")
    key_event = key_gen_button.click(
        fn=handlers["keyframes"],
        inputs=[input_fg, prompt, input_undo_steps, seed, image_width, image_height, steps, n_prompt, cfg],
        outputs=[result_gallery], api_name="keyframes", preprocess=False, **gpu)
    key_event.then(lambda: [gr.update(interactive=True)] * 3,
                   outputs=[prompt_gen_button, key_gen_button, i2v_end_btn], api_visibility="private")
    own_keyframes.change(lambda files: gr.update(interactive=True) if files else gr.update(),
                         inputs=[own_keyframes], outputs=[i2v_end_btn], api_visibility="private")
    video_event = i2v_end_btn.click(
        fn=handlers["video"],
        inputs=[result_gallery, own_keyframes, i2v_input_text, i2v_steps, i2v_cfg_scale, i2v_fps, i2v_seed],
        outputs=[i2v_output_video, i2v_output_images, downloads], api_name="video", **gpu)
    key_stop_button.click(handlers["stop"], cancels=[key_event], queue=False, api_visibility="private")
    video_stop_button.click(handlers["stop"], cancels=[video_event], queue=False, api_visibility="private")

    gr.Examples(examples=EXAMPLES, inputs=[input_fg, seed, i2v_seed], examples_per_page=1024)


def sketch_tab(handlers: dict[str, Callable], gpu: dict) -> None:
    """The "Sketch & line art" tab: line art of the upload, and sketch-stage keyframes ranked against it."""
    gr.Markdown("Line art from the chosen detectors, and key frames at sketch-stage operation steps for several "
                "seeds, ranked by their distance to that line art (closest first).")
    with gr.Row():
        with gr.Column():
            image = gr.Image(sources=["upload"], type="filepath", format="png", label="Image", height=384,
                                elem_id="sketch_image")
            detectors = gr.CheckboxGroup(label="Line-art detectors", choices=list(DETECTORS),
                                         value=list(DEFAULT_DETECTORS), elem_id="sketch_detectors")
            with gr.Row():
                tag_button = gr.Button(value="Generate Prompt", elem_id="sketch_tag_button")
            prompt = gr.Textbox(label="Prompt", interactive=True, elem_id="sketch_prompt")
            sketch_steps = gr.Dropdown(label="Sketch Steps", value=list(DEFAULT_SKETCH_STEPS),
                                       choices=list(range(1000)), multiselect=True, elem_id="sketch_steps")
            sets = gr.Slider(label="Sets (one seed each)", minimum=1, maximum=10, step=1, value=DEFAULT_SKETCH_SETS,
                             elem_id="sketch_sets")
            seed = gr.Slider(label="Seed", minimum=0, maximum=50000, step=1, value=DEFAULT_SEED, elem_id="sketch_seed")
            width, height, steps, cfg, n_prompt = keyframe_sampling_controls(
                "sketch_width", "sketch_height", "sketch_sampling_steps", "sketch_cfg", "sketch_n_prompt")
        with gr.Column():
            with gr.Row():
                lineart_button = gr.Button(value="Extract Line Art", elem_id="lineart_button")
                sketches_button = gr.Button(value="Generate Sketches", variant="primary", elem_id="sketches_button")
                stop_button = gr.Button(value="Stop", variant="stop", elem_id="sketch_stop")
            lineart_gallery = gr.Gallery(label="Line Art", height=320, object_fit="contain", columns=4, format="png",
                                         elem_id="lineart_gallery")
            sketches_gallery = gr.Gallery(label="Ranked Sketches (closest to the line art first)", height=512,
                                          object_fit="contain", columns=4, format="png", elem_id="sketches_gallery")
            downloads = gr.File(label="Downloads (ZIP of line art, sketches and settings; JSON)", file_count="multiple",
                                interactive=False, elem_id="sketch_downloads")

    tag_button.click(fn=handlers["tag"], inputs=[image], outputs=[prompt], api_visibility="private", **gpu)
    lineart_event = lineart_button.click(fn=handlers["lineart"], inputs=[image, detectors],
                                         outputs=[lineart_gallery, downloads], api_name="lineart", preprocess=False, **gpu)
    sketches_event = sketches_button.click(
        fn=handlers["sketches"],
        inputs=[image, prompt, detectors, sketch_steps, sets, seed, width, height, steps, n_prompt, cfg],
        outputs=[lineart_gallery, sketches_gallery, downloads], api_name="sketches", preprocess=False, **gpu)
    stop_button.click(handlers["stop"], cancels=[lineart_event, sketches_event], queue=False,
                      api_visibility="private")


def build_app(services: Services) -> gr.Blocks:
    handlers = make_handlers(services)
    gpu = dict(concurrency_id="gpu", concurrency_limit=1)

    with gr.Blocks(title="Paints-Undo") as demo:
        gr.Markdown("# Paints-Undo")
        gr.Markdown(missing_models_markdown(services.models), elem_id="missing_models")

        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("Drawing process", id="process", elem_id="process_tab"):
                drawing_process_tab(handlers, gpu)
            with gr.Tab("Sketch & line art", id="sketch", elem_id="sketch_tab"):
                sketch_tab(handlers, gpu)
    return demo


# -- entry point ------------------------------------------------------------------------------------


def create_services(args: argparse.Namespace) -> Services:
    models = model_manager_from_args(args)
    return Services(models=models, buckets=parse_buckets(args.video_buckets), results_dir=Path(args.results_dir))


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        auth = parse_auth(args.auth)
        services = create_services(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    public = args.share or args.host not in ("127.0.0.1", "localhost", "::1")
    if public and auth is None:
        logger.warning("=" * 72)
        logger.warning("The app is reachable from other machines (%s) WITHOUT a login.",
                       "share link" if args.share else f"--host {args.host}")
        logger.warning("Anyone who can reach it can use your GPU. Add --auth USER:PASSWORD.")
        logger.warning("=" * 72)
    demo = build_app(services)
    demo.queue(max_size=args.max_queue, default_concurrency_limit=1)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, auth=auth,
                allowed_paths=[str(services.results_dir)], prevent_thread_lock=True, show_error=True)
    if args.share and not getattr(demo, "share_url", None):
        print("error: no share link could be created (no internet access to gradio.live?); "
              "the app was not started. Run without --share to serve locally.", file=sys.stderr)
        demo.close()
        return 1
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        demo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
