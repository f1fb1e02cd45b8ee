"""Sketch extraction: line art from detectors, and keyframes at sketch-stage steps ranked against it.

Keyframes generated at high operation steps (900..999) are the model's idea of the picture's
sketch stage. We make several sets (one seed each), compute the line art of the input with the
chosen detectors, and rank every candidate by its distance to that line art: the best-matching
sketch first. This is the Sketch-Gen fork's idea; its LPIPS distance needs network weights that are
not available offline, so the default distance here is an edge-based one that needs none:

``chamfer``: binarize both pictures into ink masks (pixels darker than the mask's Otsu threshold),
then average the distance (in pixels, via a distance transform) from each ink pixel of one mask to
the nearest ink pixel of the other, both ways, divided by the image diagonal. 0 means identical
strokes; a candidate with no ink at all gets distance 1. Any callable ``(candidate_rgb, line_map)
-> float`` (LPIPS, say) can be passed as ``metric`` instead.

The line art used for ranking is that of the *cropped* input (the ``width x height`` frame the
keyframes show), so line maps and candidates are aligned pixel for pixel.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import cv2
import numpy as np

from .errors import InvalidInputError, ModelLoadError, ModelsNotAvailableError
from .images import ImageSource, load_image_rgb, resize_and_center_crop
from .keyframes import (
    DEFAULT_CFG,
    DEFAULT_NEGATIVE_PROMPT,
    DEFAULT_SEED,
    DEFAULT_STEPS,
    generate_keyframes,
    validate_keyframe_settings,
)
from .models import ModelManager, default_manager
from .progress import CancelFlag, ProgressCallback, ProgressEvent, RunControl
from .runtime import out_of_memory_guard

logger = logging.getLogger(__name__)

DEFAULT_SKETCH_STEPS = (900, 925, 950, 975)
DEFAULT_SKETCH_SETS = 3
#: More sets than this is almost certainly a typo (each set is a full keyframe run).
MAX_SKETCH_SETS = 100
#: Detector names -> (class name in ``lineart_models``, call keyword arguments).
DETECTORS = {
    "manga": ("MangaLineExtraction", {}),
    "anime": ("LineartAnimeDetector", {}),
    "lineart": ("LineartDetector", {}),
    "lineart_coarse": ("LineartDetector", {"coarse": True}),
}
DEFAULT_DETECTORS = ("manga", "anime", "lineart")
#: The public checkpoint each detector name needs (named in "missing weights" messages).
DETECTOR_FILES = {
    "manga": "erika.pth",
    "anime": "netG.pth",
    "lineart": "sk_model.pth",
    "lineart_coarse": "sk_model2.pth",
}
#: A picture whose gray levels span less than this has no strokes (paper noise is not ink).
MIN_INK_CONTRAST = 24
#: Line maps at most this many pixels off the candidate size per side are stretched, not cropped
#: (detectors round sizes up to multiples of 4 or 16 by stretching).
_STRETCH_TOLERANCE = 16

Metric = Union[str, Callable[[np.ndarray, np.ndarray], float]]


class SketchProgressEvent(ProgressEvent):
    """Progress of a sketch run: ``lineart`` (detector i of n) or ``sketches`` (set ``segment`` of ``segments``)."""

    @property
    def description(self) -> str:
        if self.stage == "lineart":
            return f"Extracting line art: detector {self.step}/{self.total}"
        if self.segment is None:
            return super().description
        return f"Generating sketches (set {self.segment + 1}/{self.segments}): step {self.step}/{self.total}"


# -- distance -----------------------------------------------------------------------------------------


def ink_mask(image: np.ndarray) -> np.ndarray:
    """Boolean mask of the strokes (dark pixels) of an RGB or gray uint8 picture, by Otsu's threshold.

    A picture without real contrast (blank paper, faint noise) has no strokes: Otsu would otherwise
    call half of the noise "ink" and make a blank candidate look close to any drawing.
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 3:
        rgb = image[:, :, :3] if image.shape[2] >= 3 else np.repeat(image[:, :, :1], 3, axis=2)
        gray = cv2.cvtColor(np.ascontiguousarray(rgb.astype(np.uint8)), cv2.COLOR_RGB2GRAY)
    else:
        gray = image
    gray = np.ascontiguousarray(gray.astype(np.uint8))
    if gray.size == 0 or int(gray.max()) - int(gray.min()) < MIN_INK_CONTRAST:
        return np.zeros(gray.shape, bool)
    threshold, _ = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return gray <= threshold


def chamfer_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Symmetric chamfer distance between the ink masks of ``a`` and ``b`` (same size), in image diagonals.

    0 for identical strokes, 1 when exactly one side has no ink, 0 when neither has.
    """
    if a.shape[:2] != b.shape[:2]:
        raise ValueError("chamfer_distance needs pictures of the same size.")
    ma, mb = ink_mask(a), ink_mask(b)
    if not ma.any() and not mb.any():
        return 0.0
    if not ma.any() or not mb.any():
        return 1.0
    diagonal = float(np.hypot(*ma.shape))

    def mean_distance(src: np.ndarray, dst: np.ndarray) -> float:
        # distanceTransform measures the distance to the nearest ZERO pixel: make dst's ink zero.
        field_ = cv2.distanceTransform(np.where(dst, 0, 255).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        return float(field_[src].mean())

    return min(1.0, (mean_distance(ma, mb) + mean_distance(mb, ma)) / (2.0 * diagonal))


def _metric(metric: Metric) -> Callable[[np.ndarray, np.ndarray], float]:
    if callable(metric):
        return metric
    if metric == "chamfer":
        return chamfer_distance
    raise InvalidInputError(f"Unknown sketch distance '{metric}'; use 'chamfer' or pass a function.")


def _metric_name(metric: Metric) -> str:
    return metric if isinstance(metric, str) else getattr(metric, "__name__", type(metric).__name__)


def rank_candidates(candidates: Sequence[np.ndarray], line_maps: Sequence[np.ndarray],
                    metric: Metric = "chamfer") -> list[tuple[float, int]]:
    """``(summed distance to every line map, candidate index)``, closest first (stable for ties)."""
    if not len(line_maps):
        raise InvalidInputError("Ranking needs at least one line-art map.")
    distance = _metric(metric)
    scores = []
    for index, candidate in enumerate(candidates):
        h, w = candidate.shape[:2]
        total = sum(float(distance(candidate, _fit(line, h, w))) for line in line_maps)
        scores.append((float(total), index))
    return sorted(scores, key=lambda s: (s[0], s[1]))


def _fit(line: np.ndarray, height: int, width: int) -> np.ndarray:
    """A line map brought to ``height x width``: as is, stretched when nearly that size, else cover + centre crop."""
    lh, lw = line.shape[:2]
    if (lh, lw) == (height, width):
        return line
    if abs(lh - height) <= _STRETCH_TOLERANCE and abs(lw - width) <= _STRETCH_TOLERANCE:
        return cv2.resize(line, (width, height), interpolation=cv2.INTER_AREA)
    return resize_and_center_crop(line, width, height)


# -- line art -------------------------------------------------------------------------------------------


def validate_detectors(detectors: Union[str, Sequence[str], None]) -> list[str]:
    """Detector names as a list (a comma-separated string is accepted; duplicates dropped), or ``InvalidInputError``."""
    if isinstance(detectors, str):
        detectors = [d for d in detectors.split(",")]
    names: list[str] = []
    for raw in detectors or ():
        name = str(raw).strip().lower()
        if not name:
            continue
        if name not in DETECTORS:
            raise InvalidInputError(f"Unknown line-art detector '{raw}'; choose from {', '.join(DETECTORS)}.")
        if name not in names:
            names.append(name)
    if not names:
        raise InvalidInputError(f"Choose at least one line-art detector ({', '.join(DETECTORS)}).")
    return names


def validate_sketch_settings(sketch_steps: Sequence[Any], num_sets: Any,
                             detectors: Union[str, Sequence[str], None]) -> tuple[list[int], int, list[str]]:
    """Normalised ``(sketch steps, sets, detectors)``, or ``InvalidInputError`` naming the first bad one.

    Duplicate steps are dropped (they would only repeat the same candidate).
    """
    if isinstance(sketch_steps, (str, bytes)) or sketch_steps is None:
        raise InvalidInputError("Sketch steps must be a list of whole numbers between 0 and 999.")
    try:
        steps = [int(s) for s in sketch_steps]
        if any(float(s) != int(s) for s in sketch_steps):
            raise ValueError
    except (TypeError, ValueError):
        raise InvalidInputError("Sketch steps must be whole numbers between 0 and 999.") from None
    if not steps:
        raise InvalidInputError("Choose at least one sketch step (0-999).")
    bad = [s for s in steps if s < 0 or s > 999]
    if bad:
        raise InvalidInputError(f"Sketch steps must be between 0 and 999, got {bad[0]}.")
    steps = list(dict.fromkeys(steps))
    try:
        sets = int(num_sets)
        if float(num_sets) != sets:
            raise ValueError
    except (TypeError, ValueError):
        raise InvalidInputError(f"The number of sketch sets must be a whole number, got {num_sets!r}.") from None
    if sets < 1 or sets > MAX_SKETCH_SETS:
        raise InvalidInputError(f"The number of sketch sets must be between 1 and {MAX_SKETCH_SETS}, got {sets}.")
    return steps, sets, validate_detectors(detectors)


def _detector(models: ModelManager, name: str):
    if name not in DETECTORS:
        raise InvalidInputError(f"Unknown line-art detector '{name}'; choose from {', '.join(DETECTORS)}.")
    return models.lineart(DETECTORS[name][0]), DETECTORS[name][1]


def _weights_problem(models: ModelManager, name: str, exc: BaseException) -> ModelsNotAvailableError:
    from .models import MODELS_DIR_ENV, _offline

    filename = DETECTOR_FILES[name]
    folder = models.sources.models_dir
    where = f"into '{folder}'" if folder is not None else f"into the models folder (--models-dir or ${MODELS_DIR_ENV})"
    online = "allow downloads (unset HF_HUB_OFFLINE)" if _offline() else "check the connection to the hub"
    logger.info("Line-art weights for '%s' not found: %s", name, exc)
    return ModelsNotAvailableError(
        f"The '{name}' line-art detector needs '{filename}' from lllyasviel/Annotators, which is neither local nor "
        f"downloadable: put {filename} {where} (or a folder named by $PAINTS_UNDO_LINEART_DIR), or {online}."
    )


def extract_lineart(image: ImageSource, detectors: Union[str, Sequence[str]] = DEFAULT_DETECTORS, *,
                    models: Optional[ModelManager] = None, progress: Optional[ProgressCallback] = None,
                    cancel: CancelFlag = None) -> dict[str, np.ndarray]:
    """Line art of ``image`` per detector: uint8 maps (255 = paper), each at its detector's output size.

    Sizes (as the original detectors): ``manga`` each side rounded up to a multiple of 16 (large
    pictures first scaled to 1280*1280 pixels), ``anime`` the input size, ``lineart`` and
    ``lineart_coarse`` each side rounded up to a multiple of 4. Unless the VRAM mode is ``high``,
    the detectors are moved back to the CPU afterwards so the diffusion models get the memory.
    """
    from lineart_models import LineartCheckpointError, LineartWeightsNotFoundError

    names = validate_detectors(detectors)
    rgb = load_image_rgb(image)
    models = models or default_manager()
    control = RunControl(progress, cancel)
    out: dict[str, np.ndarray] = {}
    used = []
    try:
        with out_of_memory_guard(models):
            for i, name in enumerate(names):
                control.check()
                control.report(SketchProgressEvent("lineart", i, len(names)))
                detector, kwargs = _detector(models, name)
                used.append(detector)
                try:
                    out[name] = np.ascontiguousarray(detector(rgb, **kwargs), dtype=np.uint8)
                except LineartWeightsNotFoundError as exc:
                    raise _weights_problem(models, name, exc) from exc
                except LineartCheckpointError as exc:
                    raise ModelLoadError(f"The '{name}' line-art detector does not load: {exc}") from exc
            control.report(SketchProgressEvent("lineart", len(names), len(names)))
    finally:
        if used and not models.memory.high_vram:
            for detector in used:
                detector.unload()
    return out


# -- sketches --------------------------------------------------------------------------------------------


@dataclass
class SketchResult:
    """Candidates ranked closest-first, with their scores and origin, plus the line art used."""

    sketches: list[np.ndarray]
    scores: list[float]
    origins: list[tuple[int, int]]  # (seed, operation step) of each ranked sketch
    line_art: dict[str, np.ndarray] = field(default_factory=dict)  # of the cropped input
    cropped_input: Optional[np.ndarray] = None
    settings: dict[str, Any] = field(default_factory=dict)  # the normalised settings of the run


def generate_sketches(
    image: ImageSource,
    prompt: str,
    sketch_steps: Sequence[int] = DEFAULT_SKETCH_STEPS,
    num_sets: int = DEFAULT_SKETCH_SETS,
    seed: int = DEFAULT_SEED,
    width: int = 512,
    height: int = 640,
    steps: int = DEFAULT_STEPS,
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT,
    cfg: float = DEFAULT_CFG,
    detectors: Sequence[str] = DEFAULT_DETECTORS,
    metric: Metric = "chamfer",
    *,
    models: Optional[ModelManager] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: CancelFlag = None,
) -> SketchResult:
    """``num_sets`` keyframe sets (seeds ``seed .. seed + num_sets - 1``) at ``sketch_steps``, ranked by line art.

    Each set is exactly ``generate_keyframes(image, prompt, sketch_steps, ..., seed + k)``. The line
    art is computed on the cropped input (the frame the keyframes show), so
    ``rank_candidates(result.sketches, list(result.line_art.values()), metric)`` gives ``result.scores``.
    """
    sketch_steps, num_sets, names = validate_sketch_settings(sketch_steps, num_sets, detectors)
    _, width, height, steps, cfg, seed = validate_keyframe_settings(sketch_steps, width, height, steps, cfg, seed)
    if seed + num_sets - 1 >= 2**63:
        raise InvalidInputError("The seed plus the number of sets must stay below 2**63.")
    distance = _metric(metric)
    prompt = "" if prompt is None else str(prompt)
    negative_prompt = "" if negative_prompt is None else str(negative_prompt)
    rgb = load_image_rgb(image)
    models = models or default_manager()
    control = RunControl(progress, cancel)
    control.check()

    cropped = resize_and_center_crop(rgb, width, height)  # == the keyframes' first frame
    line_art = extract_lineart(cropped, names, models=models, progress=progress, cancel=cancel)

    candidates: list[np.ndarray] = []
    origins: list[tuple[int, int]] = []
    for k in range(num_sets):
        control.check()

        def on_progress(event: ProgressEvent, k: int = k) -> None:
            control.report(SketchProgressEvent("sketches", event.step, event.total, k, num_sets))

        frames = generate_keyframes(rgb, prompt, sketch_steps, width, height, seed + k, steps, negative_prompt, cfg,
                                    models=models, progress=on_progress if progress else None, cancel=cancel)
        candidates.extend(frames[1:-1])
        origins.extend((seed + k, s) for s in sketch_steps)
    ranking = rank_candidates(candidates, list(line_art.values()), distance)
    logger.info("Ranked %d sketch candidates; best %.4f (seed %d, step %d)", len(candidates), ranking[0][0],
                *origins[ranking[0][1]])
    settings = dict(prompt=prompt, sketch_steps=sketch_steps, num_sets=num_sets, seed=seed, width=width,
                    height=height, steps=steps, negative_prompt=negative_prompt, cfg=cfg, detectors=names,
                    metric=_metric_name(metric))
    return SketchResult(
        sketches=[candidates[i] for _, i in ranking],
        scores=[s for s, _ in ranking],
        origins=[origins[i] for _, i in ranking],
        line_art=line_art,
        cropped_input=cropped,
        settings=settings,
    )


# -- saving ------------------------------------------------------------------------------------------------


def sketch_file_name(rank: int, seed: int, step: int, count: int = 100) -> str:
    """``rank_00_seed<S>_step<T>.png`` (rank from 0; at least two digits, more when ``count`` needs them)."""
    digits = max(2, len(str(max(0, count - 1))))
    return f"rank_{rank:0{digits}d}_seed{seed}_step{step}.png"


def sketch_caption(rank: int, score: float, origin: tuple[int, int]) -> str:
    """``#1 score 0.0123 (seed S, step T)``: the gallery caption of the ranked sketch ``rank`` (from 0)."""
    return f"#{rank + 1} score {score:.4f} (seed {origin[0]}, step {origin[1]})"


def _save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    tmp = path.with_name(f".{path.name}.tmp.png")
    Image.fromarray(np.ascontiguousarray(array)).save(tmp)
    os.replace(tmp, path)


def save_line_art(line_art: Mapping[str, np.ndarray], folder: Union[str, os.PathLike]) -> dict[str, Path]:
    """``folder/<detector>.png`` per map (gray PNG); returns ``{detector: path}``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, line in line_art.items():
        paths[name] = folder / f"{name}.png"
        _save_png(line, paths[name])
    return paths


def save_sketch_result(result: SketchResult, folder: Union[str, os.PathLike],
                       extra: Optional[Mapping[str, Any]] = None) -> dict[str, Path]:
    """Write ``lineart/<detector>.png``, ``sketches/rank_XX_seed<S>_step<T>.png`` and ``sketches.json``.

    Files of an earlier run in the same folder (other ranks or detectors) are removed first, so the
    folder always describes one run. ``extra`` goes into the JSON (input, models, device...).
    Returns ``{"lineart": folder, "sketches": folder, "json": path}``.
    """
    from . import export

    folder = Path(folder)
    line_dir, sketch_dir = folder / "lineart", folder / "sketches"
    for stale in [*sketch_dir.glob("rank_*.png"), *(line_dir / f"{d}.png" for d in DETECTORS)]:
        stale.unlink(missing_ok=True)
    line_paths = save_line_art(result.line_art, line_dir)
    sketch_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    count = len(result.sketches)
    for rank, (sketch, score, (seed, step)) in enumerate(zip(result.sketches, result.scores, result.origins)):
        path = sketch_dir / sketch_file_name(rank, seed, step, count)
        _save_png(sketch, path)
        entries.append(dict(rank=rank, file=path.relative_to(folder).as_posix(), seed=seed, step=step, score=score))
    document = dict(extra or {})
    document.update(
        settings=result.settings,
        metric=result.settings.get("metric", "chamfer"),
        line_art={name: path.relative_to(folder).as_posix() for name, path in line_paths.items()},
        sketches=entries,
    )
    json_path = export.write_sidecar(folder / "sketches.json", document)
    return {"lineart": line_dir, "sketches": sketch_dir, "json": json_path}
