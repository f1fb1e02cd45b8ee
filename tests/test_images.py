"""paints_undo.images: the original's image utilities (exact goldens) and the robust loader."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from golden import load_case
from paints_undo import images as I

CASE, TENSORS = load_case("utils")
OUT = CASE["outputs"]


def _np(name: str) -> np.ndarray:
    return TENSORS[name].numpy()


# ---------------------------------------------------------------------------------------------
# Goldens (exact)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", OUT["resize_and_center_crop_golden"], ids=lambda e: e["in"])
def test_resize_and_center_crop_golden(entry):
    got = I.resize_and_center_crop(_np(entry["in"]), entry["target_width"], entry["target_height"])
    expected = _np(entry["out"])
    assert list(got.shape) == entry["output_shape"]
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)  # max abs error 0


@pytest.mark.parametrize(
    "entry", OUT["resize_and_center_crop_shapes"], ids=lambda e: f"{e['input_shape']}->{e['target_width']}x{e['target_height']}"
)
def test_resize_and_center_crop_shapes(entry, monkeypatch):
    """Resized size, crop origin and output shape, checked by a cv2.resize spy that encodes (x, y)."""
    calls = []

    def spy(image, dsize, interpolation=None):
        calls.append((dsize, interpolation))
        w, h = dsize
        coords = (np.arange(w)[None, :] * 100_000 + np.arange(h)[:, None]).astype(np.int64)
        return coords if image.ndim == 2 else np.repeat(coords[:, :, None], image.shape[2], axis=2)

    monkeypatch.setattr(cv2, "resize", spy)
    image = np.zeros(entry["input_shape"], dtype=np.uint8)
    got = I.resize_and_center_crop(image, entry["target_width"], entry["target_height"])
    assert calls == [(tuple(entry["resized_wh"]), cv2.INTER_AREA)]
    assert list(got.shape) == entry["output_shape"]
    first = int(got[0, 0] if got.ndim == 2 else got[0, 0, 0])
    assert (first // 100_000, first % 100_000) == (entry["crop_x0"], entry["crop_y0"])


def test_resize_and_center_crop_keeps_single_channel():
    out = I.resize_and_center_crop(np.zeros((10, 12, 1), np.uint8), 6, 4)
    assert out.shape == (4, 6, 1)


def test_find_best_bucket_table():
    for entry in OUT["find_best_bucket"]:
        options = [tuple(o) for o in entry["options"]]
        assert I.find_best_bucket(entry["h"], entry["w"], options) == tuple(entry["result"]), entry


def test_find_best_bucket_rejects_no_options():
    with pytest.raises(ValueError):
        I.find_best_bucket(10, 10, [])


@pytest.mark.parametrize("entry", OUT["resize_without_crop_golden"], ids=lambda e: e["in"])
def test_resize_without_crop_golden(entry):
    got = I.resize_without_crop(_np(entry["in"]), entry["target_width"], entry["target_height"])
    assert list(got.shape) == entry["output_shape"]
    np.testing.assert_array_equal(got, _np(entry["out"]))


def test_numpy2pytorch_golden():
    got = I.numpy2pytorch(list(_np("n2p_in")))
    expected = TENSORS["n2p_out"]
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert torch.equal(got, expected)  # exact: same float32 ops as the original
    # Same memory layout as the original's movedim view (channels-last): kernels choose by layout.
    assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()


def test_pytorch2numpy_golden():
    got = I.pytorch2numpy(TENSORS["p2n_in"])
    expected = _np("p2n_out")
    assert isinstance(got, list) and len(got) == expected.shape[0]
    for g, e in zip(got, expected):
        assert g.dtype == np.uint8
        np.testing.assert_array_equal(g, e)
    # A list of CHW tensors works too.
    again = I.pytorch2numpy(list(TENSORS["p2n_in"]))
    np.testing.assert_array_equal(np.stack(again), expected)


def test_pytorch2numpy_truncates():
    x = torch.tensor([(200.9 - 127.5) / 127.5, 2.0, -2.0], dtype=torch.float32).view(1, 3, 1, 1)
    assert I.pytorch2numpy(x)[0][0, 0].tolist() == [200, 255, 0]


# ---------------------------------------------------------------------------------------------
# Loader
# ---------------------------------------------------------------------------------------------


def _png(tmp_path: Path, name: str, image: Image.Image, **kw) -> Path:
    path = tmp_path / name
    image.save(path, **kw)
    return path


def _expected_on_white(rgb, alpha):
    rgb = np.asarray(rgb, dtype=np.float64)
    a = np.asarray(alpha, dtype=np.float64)[..., None] / 255.0
    return np.rint(rgb * a + 255.0 * (1 - a)).astype(np.uint8)


def test_rgba_composited_on_white(tmp_path):
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., :3] = [10, 100, 200]
    rgba[0, :, 3] = 0
    rgba[1, :, 3] = 255
    rgba[2, :, 3] = 128
    rgba[3, :, 3] = 64
    path = _png(tmp_path, "rgba.png", Image.fromarray(rgba, "RGBA"))
    for source in (path, str(path), path.read_bytes(), Image.open(path), rgba):
        got = I.load_image_rgb(source)
        assert got.shape == (4, 5, 3) and got.dtype == np.uint8 and got.flags.c_contiguous
        np.testing.assert_array_equal(got[0], 255)
        np.testing.assert_array_equal(got[1], np.broadcast_to([10, 100, 200], (5, 3)))
        assert np.abs(got.astype(int) - _expected_on_white(rgba[..., :3], rgba[..., 3])).max() <= 1


def test_gray_and_la(tmp_path):
    gray = (np.arange(30).reshape(5, 6) * 8).astype(np.uint8)
    got = I.load_image_rgb(_png(tmp_path, "g.png", Image.fromarray(gray, "L")))
    np.testing.assert_array_equal(got, np.repeat(gray[:, :, None], 3, axis=2))
    la = np.stack([gray, np.full_like(gray, 0)], axis=2)
    la[0, :, 1] = 255
    got = I.load_image_rgb(_png(tmp_path, "la.png", Image.fromarray(la, "LA")))
    np.testing.assert_array_equal(got[0], np.repeat(gray[0][:, None], 3, axis=1))
    np.testing.assert_array_equal(got[1:], 255)


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 1000, 30000, 65535, 32896]], dtype=np.uint16)
    img = Image.fromarray(values)
    assert img.mode.startswith("I;16")
    got = I.load_image_rgb(_png(tmp_path, "deep.png", img))
    expected = np.rint(values.astype(np.float64) / 257).astype(np.uint8)
    np.testing.assert_array_equal(got[..., 0], expected)
    np.testing.assert_array_equal(got[..., 0], got[..., 2])
    assert got[0, 4, 0] == 255 and got[0, 3, 0] == 117
    # uint16 arrays behave the same way
    np.testing.assert_array_equal(I.ensure_rgb_uint8(values)[..., 1], expected)


def test_palette_images(tmp_path):
    rgb = np.zeros((6, 6, 3), np.uint8)
    rgb[:, :3] = [255, 0, 0]
    rgb[:, 3:] = [0, 0, 255]
    pal = Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=4)
    got = I.load_image_rgb(_png(tmp_path, "p.png", pal))
    np.testing.assert_array_equal(got, rgb)
    # palette with a transparent index -> white there
    blue_index = pal.getpixel((5, 0))
    path = _png(tmp_path, "pt.png", pal, transparency=blue_index)
    assert Image.open(path).mode == "P"
    got = I.load_image_rgb(path)
    np.testing.assert_array_equal(got[:, :3], rgb[:, :3])
    np.testing.assert_array_equal(got[:, 3:], 255)


def test_animated_gif_and_apng_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 6), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    gif = tmp_path / "anim.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=50, loop=0)
    apng = tmp_path / "anim.png"
    frames[0].save(apng, save_all=True, append_images=frames[1:], duration=50)
    for path in (gif, apng):
        assert Image.open(path).n_frames == 3
        got = I.load_image_rgb(path)
        assert got.shape == (6, 8, 3)
        np.testing.assert_array_equal(got, np.broadcast_to([255, 0, 0], (6, 8, 3)))
    opened = Image.open(gif)
    opened.seek(2)
    np.testing.assert_array_equal(I.load_image_rgb(opened)[0, 0], [255, 0, 0])


def test_exif_orientation_applied(tmp_path):
    stored = np.full((10, 20, 3), 255, np.uint8)
    stored[:, :10] = 0  # left half black
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rot.jpg"
    Image.fromarray(stored).save(path, exif=exif.tobytes(), quality=95)
    got = I.load_image_rgb(path)
    assert got.shape == (20, 10, 3)
    assert got[:10].mean() < 40 and got[10:].mean() > 215  # the black half is now on top


def test_one_pixel_and_min_side(tmp_path):
    path = _png(tmp_path, "one.png", Image.new("RGB", (1, 1), (1, 2, 3)))
    np.testing.assert_array_equal(I.load_image_rgb(path), [[[1, 2, 3]]])
    with pytest.raises(ValueError, match="too small"):
        I.load_image_rgb(path, min_side=2)


def test_other_modes_and_dtypes():
    cmyk = Image.new("CMYK", (3, 2), (0, 0, 0, 0))
    np.testing.assert_array_equal(I.load_image_rgb(cmyk), 255)
    f = Image.fromarray(np.full((2, 3), 0.5, np.float32), "F")
    np.testing.assert_array_equal(I.load_image_rgb(f), 128)
    np.testing.assert_array_equal(I.load_image_rgb(Image.new("1", (2, 2), 1)), 255)
    np.testing.assert_array_equal(I.ensure_rgb_uint8(np.full((2, 2, 3), 1.0)), 255)
    np.testing.assert_array_equal(I.ensure_rgb_uint8(np.zeros((2, 2, 1), bool)), 0)
    np.testing.assert_array_equal(I.ensure_rgb_uint8(np.full((2, 2), 200, np.int64)), 200)
    assert I.ensure_rgb_uint8(np.full((2, 2), np.nan, np.float32)).max() == 0


def _text_file(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("definitely not an image\n")
    return p


def _truncated_png(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    p = tmp_path / "broken.png"
    p.write_bytes(buf.getvalue()[:200])
    return p


@pytest.mark.parametrize(
    "make",
    [
        lambda tmp: b"\x89PNG\r\n\x1a\n" + b"garbage" * 10,
        lambda tmp: b"",
        lambda tmp: b"hello world",
        _text_file,
        _truncated_png,
        lambda tmp: tmp / "does_not_exist.png",
        lambda tmp: np.zeros((0, 5, 3), np.uint8),
        lambda tmp: np.zeros((5, 0), np.uint8),
        lambda tmp: np.zeros((2, 2, 2, 3), np.uint8),
        lambda tmp: np.zeros((4, 4, 5), np.uint8),
        lambda tmp: np.zeros((4, 4, 3), np.complex64),
        lambda tmp: 12345,
        lambda tmp: [[0, 0], [0, 0]],
    ],
    ids=[
        "corrupt-bytes", "empty-bytes", "random-bytes", "text-file", "truncated-png", "missing-file",
        "zero-rows", "zero-cols", "4d", "5-channels", "complex", "int", "list",
    ],
)
def test_rejects_bad_inputs(tmp_path, make):
    with pytest.raises(ValueError) as info:
        I.load_image_rgb(make(tmp_path))
    message = str(info.value)
    assert message and "\n" not in message


def _png_claiming_size(width: int, height: int) -> bytes:
    """A tiny valid-looking PNG whose IHDR claims ``width x height``."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr_start = 8 + 8  # signature, then length + b"IHDR"
    data[ihdr_start : ihdr_start + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12 : ihdr_start + 13]))
    data[ihdr_start + 13 : ihdr_start + 17] = struct.pack(">I", crc)
    return bytes(data)


def test_rejects_huge_images(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_claiming_size(100_000, 100_000))
    with pytest.raises(ValueError, match="too large"):
        I.load_image_rgb(bomb)
    # Below PIL's own bomb limit but above ours.
    with pytest.raises(ValueError, match="too large"):
        I.load_image_rgb(_png_claiming_size(9000, 8000))
    small = _png(tmp_path, "s.png", Image.new("RGB", (5, 4)))
    with pytest.raises(ValueError, match="too large"):
        I.load_image_rgb(small, max_pixels=19)
    assert I.load_image_rgb(small, max_pixels=20).shape == (4, 5, 3)
    with pytest.raises(ValueError, match="too large"):
        I.ensure_rgb_uint8(np.zeros((5, 4, 3), np.uint8), max_pixels=19)


def test_pil_decompression_bomb_warning_is_an_error(tmp_path, monkeypatch):
    path = _png(tmp_path, "w.png", Image.new("RGB", (12, 12)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 144 px: PIL warns (errors above 200)
    with pytest.raises(ValueError, match="too large"):
        I.load_image_rgb(path, max_pixels=None)

