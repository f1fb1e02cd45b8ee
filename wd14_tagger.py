"""WD14 (wd-v1-4-moat-tagger-v2) image tagger: turns an illustration into a prompt.

Behaviour matches the original Paints-UNDO ``wd14tagger.default_interrogator`` exactly (same
preprocessing, same tag order, thresholds, exclusion and escaping), because the prompt it writes
feeds the diffusion models. What differs is plumbing only:

* the model files come from a local folder (``model_dir=`` or ``$PAINTS_UNDO_TAGGER_DIR``) or from
  the Hugging Face cache (``lllyasviel/misc`` via ``hf_hub_download``, which honours ``HF_HOME``,
  ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE``), never from/into the working directory;
* nothing is loaded or downloaded at import; the ONNX session and the label CSV are created on
  first use and cached (thread-safe) per file and provider list;
* inputs are validated: odd modes/depths are converted, unusable inputs raise ``ValueError``.
"""

from __future__ import annotations

import csv
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
from PIL import Image

from paints_undo import images as _images

if TYPE_CHECKING:  # pragma: no cover - typing only
    import onnxruntime

logger = logging.getLogger(__name__)

__all__ = [
    "MODEL_NAME",
    "ONNX_FILENAME",
    "CSV_FILENAME",
    "HUB_REPO_ID",
    "MODEL_DIR_ENV",
    "TaggerUnavailableError",
    "TagLabels",
    "resolve_model_files",
    "preprocess",
    "predict_probabilities",
    "default_interrogator",
    "clear_cache",
]

MODEL_NAME = "wd-v1-4-moat-tagger-v2"
ONNX_FILENAME = f"{MODEL_NAME}.onnx"
CSV_FILENAME = f"{MODEL_NAME}.csv"
HUB_REPO_ID = "lllyasviel/misc"
MODEL_DIR_ENV = "PAINTS_UNDO_TAGGER_DIR"

#: Input side used when the ONNX graph does not state a fixed one (the real model says 448).
_FALLBACK_SIZE = 448
_GENERAL_CATEGORY = "0"
_CHARACTER_CATEGORY = "4"

ImageInput = Union[str, "os.PathLike[str]", Image.Image, np.ndarray]


class TaggerUnavailableError(RuntimeError):
    """The tagger model files are missing and cannot be downloaded (or cannot be loaded)."""


@dataclass(frozen=True)
class TagLabels:
    """The CSV rows the tagger needs: raw names plus where general and character tags start."""

    names: tuple[str, ...]
    general_start: int
    character_start: int


class _TaggerCache:
    """Lazily created ONNX sessions and parsed label files, shared by all threads.

    Keyed by resolved file path (plus provider list for sessions) so that different model
    folders never share state. Creation happens under a lock: a Gradio server may tag from
    several worker threads at once, and building two sessions would double the memory.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[tuple[str, tuple[str, ...]], Any] = {}
        self._labels: dict[str, TagLabels] = {}

    def session(self, onnx_path: Path, providers: tuple[str, ...]) -> "onnxruntime.InferenceSession":
        key = (str(onnx_path), providers)
        with self._lock:
            found = self._sessions.get(key)
            if found is None:
                found = _create_session(onnx_path, providers)
                self._sessions[key] = found
            return found

    def labels(self, csv_path: Path) -> TagLabels:
        key = str(csv_path)
        with self._lock:
            found = self._labels.get(key)
            if found is None:
                found = _read_labels(csv_path)
                self._labels[key] = found
            return found

    def clear(self) -> None:
        with self._lock:
            self._sessions.clear()
            self._labels.clear()


_CACHE = _TaggerCache()


def clear_cache() -> None:
    """Forget cached sessions and labels (frees memory; the next call reloads)."""
    _CACHE.clear()


# ---------------------------------------------------------------------------------------------
# Model files
# ---------------------------------------------------------------------------------------------


def _how_to_provide() -> str:
    return (
        f"put {ONNX_FILENAME} and {CSV_FILENAME} in a folder and pass model_dir= or set {MODEL_DIR_ENV}, "
        f"or allow downloads from the Hugging Face repo {HUB_REPO_ID}"
    )


def _offline_requested() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def resolve_model_files(model_dir: "str | os.PathLike[str] | None" = None) -> tuple[Path, Path]:
    """Paths of the ONNX model and the label CSV, downloading them to the HF cache if needed.

    An explicit folder (``model_dir`` or ``$PAINTS_UNDO_TAGGER_DIR``) is used as is and never
    falls back to the hub: a configured location that lacks the files is a setup error worth
    reporting, not something to paper over with a silent download.
    """
    folder = model_dir if model_dir is not None else os.environ.get(MODEL_DIR_ENV) or None
    if folder is not None:
        root = Path(folder).expanduser()
        paths = (root / ONNX_FILENAME, root / CSV_FILENAME)
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            source = "model_dir" if model_dir is not None else MODEL_DIR_ENV
            raise TaggerUnavailableError(
                f"WD14 tagger file(s) {', '.join(missing)} not found in {root} (from {source}); "
                f"put {ONNX_FILENAME} and {CSV_FILENAME} there, or unset it to download them from {HUB_REPO_ID}."
            )
        return paths[0].resolve(), paths[1].resolve()

    from huggingface_hub import hf_hub_download  # imported lazily: keeps `import wd14_tagger` cheap

    found: list[Path] = []
    failures: list[tuple[str, BaseException]] = []
    for filename in (ONNX_FILENAME, CSV_FILENAME):
        try:
            # After one failure only look in the cache: the error will name every missing file
            # without waiting through a second round of network retries.
            found.append(Path(hf_hub_download(repo_id=HUB_REPO_ID, filename=filename, local_files_only=bool(failures))))
        except Exception as exc:  # offline, network, auth, disk...: all mean "unavailable"
            failures.append((filename, exc))
    if failures:
        names = ", ".join(name for name, _ in failures)
        if _offline_requested():
            reason = "downloads are disabled (HF_HUB_OFFLINE=1)"
        else:
            first = failures[0][1]
            detail = (str(first).splitlines() or [type(first).__name__])[0]
            reason = f"the download failed ({type(first).__name__}: {detail})"
        raise TaggerUnavailableError(
            f"WD14 tagger file(s) {names} are not in the Hugging Face cache and {reason}; {_how_to_provide()}."
        ) from failures[0][1]
    return found[0], found[1]


def _providers() -> tuple[str, ...]:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return ("CUDAExecutionProvider", "CPUExecutionProvider")
    return ("CPUExecutionProvider",)


def _create_session(onnx_path: Path, providers: tuple[str, ...]) -> "onnxruntime.InferenceSession":
    import onnxruntime as ort

    logger.info("Loading WD14 tagger %s with %s", onnx_path, ", ".join(providers))
    try:
        return ort.InferenceSession(str(onnx_path), providers=list(providers))
    except Exception as exc:
        detail = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise TaggerUnavailableError(
            f"Cannot load the WD14 tagger model {onnx_path} ({detail}); replace the file with a valid copy."
        ) from exc


def _read_labels(csv_path: Path) -> TagLabels:
    """Parse the tag CSV (header, then ratings, general tags, character tags)."""
    names: list[str] = []
    general_start: int | None = None
    character_start: int | None = None
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            next(reader, None)  # header: tag_id,name,category,count
            for index, row in enumerate(reader):
                if len(row) < 3:
                    raise ValueError(f"row {index + 2} has {len(row)} columns, expected at least 3")
                category = row[2]
                if general_start is None and category == _GENERAL_CATEGORY:
                    general_start = index
                elif character_start is None and category == _CHARACTER_CATEGORY:
                    character_start = index
                names.append(row[1])
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as exc:
        raise TaggerUnavailableError(
            f"Cannot read the WD14 tag list {csv_path} ({exc}); replace the file with a valid copy."
        ) from exc
    end = len(names)
    return TagLabels(
        names=tuple(names),
        general_start=end if general_start is None else general_start,
        character_start=end if character_start is None else character_start,
    )


# ---------------------------------------------------------------------------------------------
# Input conversion and preprocessing
# ---------------------------------------------------------------------------------------------


def _array_to_pil(array: np.ndarray) -> Image.Image:
    """A numpy image as the PIL image the original's ``Image.fromarray`` would make.

    uint8 HxW / HxWx3 / HxWx4 go straight through ``Image.fromarray`` (bit-exact with the
    original); other depths are scaled to 8 bit first, HxWx1 is squeezed, HxWx2 becomes RGBA.
    """
    if array.size == 0:
        raise ValueError(f"Image array is empty (shape {array.shape}).")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (2, 3, 4)):
        raise ValueError(f"Image array must be HxW, HxWx1, HxWx2, HxWx3 or HxWx4, got shape {array.shape}.")
    data = np.ascontiguousarray(_images.scale_to_uint8(array))
    if data.ndim == 3 and data.shape[2] == 2:
        return Image.fromarray(data, mode="LA").convert("RGBA")
    return Image.fromarray(data)


def _normalise_pil(image: Image.Image) -> Image.Image:
    """Bring any PIL mode to RGB, L or RGBA, the modes whose handling the original defines.

    RGB/L/RGBA pass through untouched (so results match the original). Alpha-carrying modes
    become RGBA, so their alpha is ignored the same way; deep modes are scaled to 8-bit gray.
    """
    mode = image.mode
    if mode in ("RGB", "L", "RGBA"):
        return image
    if mode == "1":
        return image.convert("L")
    if mode == "P":
        return image.convert("RGBA" if "transparency" in image.info else "RGB")
    if mode in ("PA", "LA", "La", "RGBa"):
        return image.convert("RGBA")
    if mode in ("I", "F") or mode.startswith("I;16"):
        return Image.fromarray(np.ascontiguousarray(_images.scale_to_uint8(np.array(image))))
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ValueError(f"Unsupported PIL image mode {mode!r}.") from exc


def _to_pil(image: ImageInput) -> Image.Image:
    if isinstance(image, (str, os.PathLike)):
        return _images.open_image(image)
    if isinstance(image, np.ndarray):
        return _array_to_pil(image)
    if isinstance(image, Image.Image):
        if getattr(image, "n_frames", 1) > 1 and image.tell() != 0:
            image.seek(0)  # animated input: tag the first frame
        try:
            image.load()
        except Exception as exc:
            raise ValueError(f"Cannot decode the given PIL image ({exc}).") from exc
        return image
    raise ValueError(
        f"Unsupported image type {type(image).__name__}; expected a numpy array, a PIL image or a file path."
    )


def preprocess(image: ImageInput, size: int = _FALLBACK_SIZE) -> np.ndarray:
    """The model input for ``image``: float32 ``[1, size, size, 3]``, BGR, values 0..255.

    As in the original: scale the longer side to ``size`` (``int()`` truncation of the other),
    PIL LANCZOS, paste centred on a white RGB square *without* a mask (alpha is ignored), then
    RGB -> BGR.
    """
    pil = _normalise_pil(_to_pil(image))
    width, height = pil.size
    if width <= 0 or height <= 0:
        raise ValueError(f"Image is empty ({width}x{height} pixels).")
    ratio = float(size) / max(width, height)
    # max(1, .) only matters for extreme aspect ratios, where the original would crash.
    new_size = (max(1, int(width * ratio)), max(1, int(height * ratio)))
    resized = pil.resize(new_size, Image.LANCZOS)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(resized, ((size - new_size[0]) // 2, (size - new_size[1]) // 2))
    array = np.array(canvas).astype(np.float32)[:, :, ::-1]
    return np.ascontiguousarray(array[None])


def _input_size(session: Any) -> int:
    side = session.get_inputs()[0].shape[1]
    if isinstance(side, int) and side > 0:
        return side
    logger.warning("Tagger input side is not fixed (%r); using %d", side, _FALLBACK_SIZE)
    return _FALLBACK_SIZE


def predict_probabilities(
    image: ImageInput, *, model_dir: "str | os.PathLike[str] | None" = None
) -> tuple[TagLabels, np.ndarray]:
    """The tag labels and the model's per-tag probabilities (float32 ``[num_tags]``) for ``image``."""
    onnx_path, csv_path = resolve_model_files(model_dir)
    # Validate and convert the image before building the session, so bad input fails fast.
    pil = _normalise_pil(_to_pil(image))
    session = _CACHE.session(onnx_path, _providers())
    labels = _CACHE.labels(csv_path)
    batch = preprocess(pil, _input_size(session))
    model_input = session.get_inputs()[0]
    output_name = session.get_outputs()[0].name
    probs = np.asarray(session.run([output_name], {model_input.name: batch})[0][0])
    if probs.shape[0] != len(labels.names):
        raise TaggerUnavailableError(
            f"The WD14 model gives {probs.shape[0]} scores but {csv_path} lists {len(labels.names)} tags; "
            f"use the {ONNX_FILENAME} and {CSV_FILENAME} that belong together."
        )
    return labels, probs


def default_interrogator(
    image: ImageInput,
    threshold: float = 0.35,
    character_threshold: float = 0.85,
    exclude_tags: str = "",
    *,
    model_dir: "str | os.PathLike[str] | None" = None,
) -> str:
    """A comma-separated tag prompt for ``image``, exactly as the original writes it.

    Character tags (prob > ``character_threshold``) come first, then general tags
    (prob > ``threshold``), each in CSV order; ratings are never output. ``exclude_tags`` is
    lowercased, split on ',' and stripped, and compared to the raw CSV names (with underscores).
    Parentheses are escaped and every '_' in the result becomes a space.
    """
    labels, probs = predict_probabilities(image, model_dir=model_dir)
    names = labels.names
    general = [
        (names[i], probs[i])
        for i in range(labels.general_start, labels.character_start)
        if probs[i] > threshold
    ]
    character = [
        (names[i], probs[i]) for i in range(labels.character_start, len(names)) if probs[i] > character_threshold
    ]
    excluded = {part.strip() for part in exclude_tags.lower().split(",")}
    kept = [name for name, _ in character + general if name not in excluded]
    escaped = (name.replace("(", "\\(").replace(")", "\\)") for name in kept)
    return ", ".join(escaped).replace("_", " ")
