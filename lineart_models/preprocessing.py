"""Pure image helpers shared by the detectors: input normalisation and the size rules of each network.

The size rules reproduce the original detectors exactly (they decide which pixels the networks see), so
they are plain functions that the tests pin against the recorded tables.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

#: Pixel budget above which MangaLineExtraction downsizes its input (1280*1280).
MANGA_MAX_PIXELS = 1280 * 1280
#: MangaLineExtraction works on multiples of 16 (four stride-2 stages).
MANGA_MULTIPLE = 16
#: LineartAnimeDetector works on multiples of 256 (eight stride-2 levels).
ANIME_MULTIPLE = 256
#: The sketch generator's reflection pads need at least this many pixels per side (smaller inputs
#: crash the original); tinier pictures are edge-padded up to it and the output is cropped back.
SKETCH_MIN_SIDE = 8


def _round_up(value: int, multiple: int) -> int:
    return value + (multiple - value % multiple) % multiple


def sketch_output_size(h: int, w: int) -> tuple[int, int]:
    """Output size of ``LineartDetector``: ``(4*ceil(h/4), 4*ceil(w/4))`` (two stride-2 convs, two up-convs)."""
    return 4 * math.ceil(h / 4), 4 * math.ceil(w / 4)


def anime_network_size(h: int, w: int) -> tuple[int, int]:
    """Network input size of ``LineartAnimeDetector``: each side rounded UP to a multiple of 256 (1 -> 256)."""
    return ANIME_MULTIPLE * math.ceil(h / ANIME_MULTIPLE), ANIME_MULTIPLE * math.ceil(w / ANIME_MULTIPLE)


def manga_network_size(h: int, w: int) -> tuple[int, int]:
    """Network input (= output) size of ``MangaLineExtraction``.

    Pictures over 1280*1280 pixels are scaled to that budget keeping the aspect ratio (sides truncated with
    ``int``), then each side is rounded UP to a multiple of 16. The float arithmetic follows the original
    statement by statement so that the truncation lands on the same integers. A side that would truncate
    to 0 (extreme aspect ratios, where the original crashes) is kept at 1 before rounding.
    """
    total = h * w
    if total > MANGA_MAX_PIXELS:
        ratio = (MANGA_MAX_PIXELS / total) ** 0.5
        h = max(1, int(h * ratio))
        w = max(1, int(w * ratio))
    return _round_up(h, MANGA_MULTIPLE), _round_up(w, MANGA_MULTIPLE)


def to_rgb_uint8(image: object) -> np.ndarray:
    """Normalise a picture to a contiguous ``H x W x 3`` uint8 RGB array.

    Valid ``H x W x 3`` uint8 input is returned unchanged (same values), so the detectors keep the original
    behaviour for it. Extras: gray ``H x W`` / ``H x W x 1`` is replicated to RGB; RGBA is composited on a
    WHITE background (transparent line art should read as paper, not as black ink); uint16 is scaled to
    8 bit; bool maps to 0/255; floats are read as [0, 1] (clipped) and scaled; other integer types must
    already hold 0..255.

    Raises:
        ValueError: for non-arrays, empty pictures, unsupported shapes/dtypes or non-finite values.
    """
    if not isinstance(image, np.ndarray):
        raise ValueError(
            f"Line-art detectors take a numpy image array (H x W x 3 RGB uint8), got {type(image).__name__}."
        )
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
        raise ValueError(
            f"Line-art detectors take an H x W, H x W x 1, H x W x 3 or H x W x 4 image, got shape {image.shape}."
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"Line-art detectors cannot process an empty image (shape {image.shape}).")

    has_alpha = image.ndim == 3 and image.shape[2] == 4
    if image.dtype == np.uint8 and not has_alpha:
        rgb = image if image.ndim == 3 else np.repeat(image[:, :, None], 3, axis=2)
        return np.ascontiguousarray(rgb)

    unit = _to_unit_float(image)  # float32 in [0, 1]
    if unit.ndim == 2:
        unit = np.repeat(unit[:, :, None], 3, axis=2)
    elif has_alpha:
        alpha = unit[:, :, 3:4]
        unit = unit[:, :, :3] * alpha + (1.0 - alpha)
    return np.ascontiguousarray(np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8))


def _to_unit_float(image: np.ndarray) -> np.ndarray:
    """Map any supported dtype to float32 in [0, 1]."""
    dtype = image.dtype
    if dtype == np.bool_:
        return image.astype(np.float32)
    if dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if dtype == np.uint16:
        return image.astype(np.float32) / 65535.0
    if np.issubdtype(dtype, np.integer):
        lo, hi = int(image.min()), int(image.max())
        if lo < 0 or hi > 255:
            raise ValueError(
                f"Integer images of dtype {dtype} must hold 0..255 (got {lo}..{hi}); pass uint8 or uint16 instead."
            )
        return image.astype(np.float32) / 255.0
    if np.issubdtype(dtype, np.floating):
        if not np.isfinite(image).all():
            raise ValueError("Float images passed to the line-art detectors must not contain NaN or infinity.")
        return np.clip(image.astype(np.float32), 0.0, 1.0)
    raise ValueError(f"Unsupported image dtype {dtype}; pass uint8 RGB (or uint16 / float in [0, 1]).")


def combine_linearts(first: np.ndarray, second: np.ndarray, erode: tuple[bool, bool] = (False, False)) -> np.ndarray:
    """Pixel-wise darkest of two line maps (optionally thickening either first with a 3x3 erosion)."""
    if erode[0]:
        first = cv2.erode(first, np.ones((3, 3), np.uint8))
    if erode[1]:
        second = cv2.erode(second, np.ones((3, 3), np.uint8))
    return np.minimum(first, second)
