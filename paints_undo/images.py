"""Image helpers shared by the app, the CLI and the pipelines.

Two groups live here:

* the original's small image utilities (``resize_and_center_crop``, ``find_best_bucket``,
  ``resize_without_crop``, ``numpy2pytorch``, ``pytorch2numpy``). They are reproduced with the
  *exact* numerics of Paints-UNDO (same resamplers, same rounding and truncation), because the
  pipelines' outputs depend on them bit for bit;
* a defensive loader (``load_image_rgb`` / ``ensure_rgb_uint8``) that turns whatever a user hands
  us (files, bytes, PIL images, arrays of any common depth and channel layout) into the one format
  the pipelines accept, HxWx3 uint8 RGB, and rejects broken or hostile inputs with a one-sentence
  ``ValueError`` instead of a deep stack trace.

torch is imported lazily so that importing this module stays cheap for callers (tagger, CLI
argument parsing) that never touch tensors.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from typing import TYPE_CHECKING, Iterable, Sequence, Union

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageLoadError",
    "ImageSource",
    "resize_and_center_crop",
    "find_best_bucket",
    "resize_without_crop",
    "numpy2pytorch",
    "pytorch2numpy",
    "scale_to_uint8",
    "open_image",
    "load_image_rgb",
    "ensure_rgb_uint8",
]

#: Largest image (in pixels) the loader accepts: 64 megapixels. Larger inputs are almost always
#: mistakes or decompression bombs, and would exhaust memory long before the models run.
DEFAULT_MAX_PIXELS = 64_000_000

ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Image.Image, np.ndarray]

class ImageLoadError(ValueError):
    """An image input that cannot be used; the message is one sentence meant for the user."""


# Modes that ``Image.convert("RGB")`` handles correctly and that carry no alpha.
_CONVERT_TO_RGB_MODES = {"CMYK", "YCbCr", "LAB", "HSV", "RGBX"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


# ---------------------------------------------------------------------------------------------
# The original's utilities (exact behaviour)
# ---------------------------------------------------------------------------------------------


def resize_and_center_crop(
    image: np.ndarray,
    target_width: int,
    target_height: int,
    interpolation: int = cv2.INTER_AREA,
) -> np.ndarray:
    """Scale ``image`` to cover ``target_width x target_height``, then crop the centre.

    Same numerics as the original: the cover factor is ``max(th/h, tw/w)``, the scaled size uses
    Python's ``round`` (half to even), OpenCV resizes (INTER_AREA by default) and the crop origin
    is floor-centred. Works for HxW and HxWxC arrays; the channel count is preserved.
    """
    image = np.asarray(image)
    if image.ndim not in (2, 3) or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"resize_and_center_crop needs a non-empty HxW or HxWxC image, got shape {image.shape}.")
    target_width, target_height = int(target_width), int(target_height)
    if target_width <= 0 or target_height <= 0:
        raise ValueError(f"Target size must be positive, got {target_width}x{target_height}.")

    height, width = image.shape[:2]
    scale = max(target_height / height, target_width / width)
    new_width = int(round(width * scale))
    new_height = int(round(height * scale))
    resized = cv2.resize(image, (new_width, new_height), interpolation=interpolation)
    if image.ndim == 3 and resized.ndim == 2:  # OpenCV drops a trailing singleton channel
        resized = resized[:, :, None]
    left = (new_width - target_width) // 2
    top = (new_height - target_height) // 2
    return resized[top : top + target_height, left : left + target_width]


def find_best_bucket(h: int, w: int, options: Iterable[Sequence[int]]) -> tuple[int, int]:
    """The ``(bucket_h, bucket_w)`` whose aspect ratio is closest to ``h:w``.

    The metric is ``|h*bw - w*bh|`` and, as in the original, a later option wins ties (``<=``),
    so a square image maps to ``(448, 384)`` with the video buckets.
    """
    best: tuple[int, int] | None = None
    best_metric = float("inf")
    for bucket_h, bucket_w in options:
        metric = abs(h * bucket_w - w * bucket_h)
        if metric <= best_metric:
            best_metric = metric
            best = (bucket_h, bucket_w)
    if best is None:
        raise ValueError("find_best_bucket needs at least one (height, width) option.")
    return best


def resize_without_crop(image: np.ndarray, target_width: int, target_height: int) -> np.ndarray:
    """Resize to exactly ``target_width x target_height`` with PIL's LANCZOS (aspect not kept)."""
    resized = Image.fromarray(np.asarray(image)).resize((int(target_width), int(target_height)), Image.LANCZOS)
    return np.array(resized)


def numpy2pytorch(imgs: Sequence[np.ndarray]) -> "torch.Tensor":
    """HWC uint8 images -> float32 ``[B, C, H, W]`` in [-1, 1] (``x / 127.5 - 1``).

    The result is the original's ``movedim`` *view*, i.e. channels-last in memory. That is kept on
    purpose: convolutions pick their CPU/GPU kernels by memory layout, and with some inputs the
    two layouts round differently by more than the golden tolerances (seen on the video VAE).
    """
    import torch

    if len(imgs) == 0:
        raise ValueError("numpy2pytorch needs at least one image.")
    batch = torch.from_numpy(np.ascontiguousarray(np.stack(imgs, axis=0)))
    batch = batch.float() / 127.5 - 1.0
    return batch.movedim(-1, 1)


def pytorch2numpy(imgs: "torch.Tensor | Iterable[torch.Tensor]") -> list[np.ndarray]:
    """``[B, C, H, W]`` in [-1, 1] -> list of HWC uint8 images.

    As in the original, the affine map runs in the tensor's own dtype, then the values are cast
    to float32, clipped to 0..255 and *truncated* (``astype(uint8)``), not rounded.
    """
    results = []
    for x in imgs:
        y = x.movedim(0, -1) * 127.5 + 127.5
        y = y.detach().float().cpu().numpy()
        results.append(y.clip(0, 255).astype(np.uint8))
    return results


# ---------------------------------------------------------------------------------------------
# Depth / channel normalisation
# ---------------------------------------------------------------------------------------------


def scale_to_uint8(array: np.ndarray) -> np.ndarray:
    """Map an array of any numeric depth to uint8 *by scaling*, never by clipping a range away.

    * uint8: unchanged;  bool: 0/255;
    * uint16 (16-bit PNG/TIFF): ``round(x / 257)`` so 65535 -> 255;
    * other integers: kept if they already fit 0..255, else treated as 16-bit (clipped to 0..65535);
    * floats: NaN/inf -> 0/limits; data within [0, 1] is scaled by 255, anything else is taken as
      0..255 and clipped.

    The shape (including any alpha channel) is left alone.
    """
    array = np.asarray(array)
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        if array.size and array.min() >= 0 and array.max() <= 255 and array.dtype != np.uint16:
            return array.astype(np.uint8)
        wide = np.clip(array.astype(np.int64), 0, 65535)
        return ((wide * 255 + 32767) // 65535).astype(np.uint8)  # == round(x / 257)
    if np.issubdtype(array.dtype, np.floating):
        data = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if data.size and data.min() >= 0.0 and data.max() <= 1.0:
            data = data * 255.0
        return np.clip(np.rint(data), 0, 255).astype(np.uint8)
    raise ImageLoadError(f"Unsupported image array dtype {array.dtype}; expected an integer, float or bool array.")


def _check_size(height: int, width: int, min_side: int, max_pixels: int | None) -> None:
    if height <= 0 or width <= 0:
        raise ImageLoadError(f"Image is empty ({width}x{height} pixels).")
    if min(height, width) < min_side:
        raise ImageLoadError(f"Image is too small ({width}x{height}); each side must be at least {min_side} pixels.")
    if max_pixels is not None and height * width > max_pixels:
        raise ImageLoadError(
            f"Image is too large ({width}x{height} = {height * width:,} pixels); the limit is {max_pixels:,} pixels."
        )


def _composite_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Alpha-blend uint8 ``rgb`` over white: transparent areas should look like blank paper."""
    a = alpha.astype(np.uint32)[..., None]
    out = (rgb.astype(np.uint32) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def ensure_rgb_uint8(
    array: np.ndarray,
    *,
    min_side: int = 1,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Any in-memory image array -> contiguous HxWx3 uint8 RGB.

    Accepts HxW (gray), HxWx1, HxWx2 (gray+alpha), HxWx3 (RGB) and HxWx4 (RGBA) of any depth
    handled by ``scale_to_uint8``. Alpha is composited onto white.
    """
    if not isinstance(array, np.ndarray):
        raise ImageLoadError(f"Expected a numpy array, got {type(array).__name__}.")
    if array.size == 0:
        raise ImageLoadError(f"Image array is empty (shape {array.shape}).")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (2, 3, 4)):
        raise ImageLoadError(
            f"Image array must be HxW, HxWx1, HxWx2, HxWx3 or HxWx4, got shape {array.shape}."
        )
    _check_size(array.shape[0], array.shape[1], min_side, max_pixels)

    data = scale_to_uint8(array)
    if data.ndim == 2:
        rgb = np.repeat(data[:, :, None], 3, axis=2)
    elif data.shape[2] == 2:
        rgb = _composite_on_white(np.repeat(data[:, :, :1], 3, axis=2), data[:, :, 1])
    elif data.shape[2] == 4:
        rgb = _composite_on_white(data[:, :, :3], data[:, :, 3])
    else:
        rgb = data
    return np.ascontiguousarray(rgb, dtype=np.uint8)


def _pil_to_array(image: Image.Image) -> np.ndarray:
    """A PIL image as an array ``ensure_rgb_uint8`` understands, alpha kept, depth kept."""
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode == "PA":
        image = image.convert("RGBA")
    elif mode == "1":
        image = image.convert("L")
    elif mode == "La":
        image = image.convert("LA")
    elif mode == "RGBa":
        image = image.convert("RGBA")
    elif mode in _CONVERT_TO_RGB_MODES:
        image = image.convert("RGB")
    elif mode in _SIXTEEN_BIT_MODES:
        return np.array(image).astype(np.uint16)
    elif mode not in ("L", "LA", "RGB", "RGBA", "I", "F"):
        try:
            image = image.convert("RGBA")
        except (ValueError, OSError) as exc:
            raise ImageLoadError(f"Unsupported image mode {mode!r}.") from exc
    return np.array(image)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def open_image(
    source: "str | os.PathLike[str] | bytes | bytearray | memoryview",
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    exif_transpose: bool = True,
) -> Image.Image:
    """Open and fully decode the first frame of an image file or byte string.

    The pixel limit is checked from the header *before* decoding, and PIL's own
    decompression-bomb warning is treated as an error, so a tiny file claiming a huge size is
    rejected without allocating it. EXIF orientation is applied (the image as a viewer shows it).
    The returned image is detached from the file, which is closed.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageLoadError("Image data is empty (0 bytes).")
        fp: "str | io.BytesIO" = io.BytesIO(bytes(source))
        label = "image data"
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ImageLoadError(f"Image file not found: {path}")
        fp = path
        label = f"image file '{os.path.basename(path)}'"
    else:
        raise ImageLoadError(f"Cannot open an image from {type(source).__name__}; expected a path or bytes.")

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as im:
                width, height = im.size
                if max_pixels is not None and width * height > max_pixels:
                    raise ImageLoadError(
                        f"{label.capitalize()} is too large ({width}x{height} = {width * height:,} pixels); "
                        f"the limit is {max_pixels:,} pixels."
                    )
                im.seek(0)  # first frame of animated GIF / APNG / multi-page TIFF
                im.load()
                frame = im.copy()
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(f"Refusing to open {label}: it is too large ({exc}).") from exc
    except UnidentifiedImageError as exc:
        raise ImageLoadError(f"Cannot read {label}: it is not an image in a known format (PNG, JPEG, WebP, ...).") from exc
    except (OSError, SyntaxError, EOFError, ValueError, IndexError, KeyError, TypeError, MemoryError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageLoadError(f"Cannot read {label}: the file is corrupt or truncated ({first_line}).") from exc

    if exif_transpose:
        try:
            frame = ImageOps.exif_transpose(frame)
        except Exception as exc:  # malformed EXIF must not make an otherwise fine image unusable
            logger.warning("Ignoring unreadable EXIF orientation of %s: %s", label, exc)
    return frame


def load_image_rgb(
    source: ImageSource,
    *,
    min_side: int = 1,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Load any supported image source as HxWx3 uint8 RGB.

    ``source`` may be a path, encoded bytes, a PIL image or a numpy array. Transparency is
    composited onto white, gray/palette/CMYK/16-bit/float data is converted (16-bit is *scaled*
    to 8 bit), EXIF orientation is applied to files, and animated images yield their first frame.
    Anything unusable raises ``ValueError`` with a one-sentence reason.
    """
    if isinstance(source, np.ndarray):
        return ensure_rgb_uint8(source, min_side=min_side, max_pixels=max_pixels)
    if isinstance(source, Image.Image):
        width, height = source.size
        _check_size(height, width, min_side, max_pixels)
        if getattr(source, "n_frames", 1) > 1 and source.tell() != 0:
            source.seek(0)
        try:
            array = _pil_to_array(source)
        except ImageLoadError:
            raise
        except (OSError, SyntaxError, EOFError, ValueError) as exc:
            raise ImageLoadError(f"Cannot decode the given PIL image ({exc}).") from exc
        return ensure_rgb_uint8(array, min_side=min_side, max_pixels=max_pixels)
    if isinstance(source, (str, os.PathLike, bytes, bytearray, memoryview)):
        image = open_image(source, max_pixels=max_pixels)
        width, height = image.size
        _check_size(height, width, min_side, max_pixels)
        return ensure_rgb_uint8(_pil_to_array(image), min_side=min_side, max_pixels=max_pixels)
    raise ImageLoadError(
        f"Unsupported image source of type {type(source).__name__}; expected a path, bytes, PIL image or numpy array."
    )
