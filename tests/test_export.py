"""Tests for paints_undo.export: encoders, provenance metadata, atomic writes, names, sidecar."""

from __future__ import annotations

import datetime as dt
import json
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageSequence

from paints_undo import export
from paints_undo.export import (
    SYNTHETIC_COMMENT,
    ExportError,
    as_frames,
    export_all,
    probe_video,
    read_video_frames,
    reserve_output_path,
    unique_output_stem,
    write_gif,
    write_mp4,
    write_png_zip,
    write_sidecar,
    write_webm,
)

T = 9


def make_clip(frames: int = T, height: int = 80, width: int = 128) -> np.ndarray:
    """Smooth gradients plus a moving red square (every frame differs from the previous one)."""
    y, x = np.mgrid[0:height, 0:width]
    clip = np.zeros((frames, height, width, 3), dtype=np.uint8)
    for t in range(frames):
        clip[t, ..., 0] = x * 255 // max(width - 1, 1)
        clip[t, ..., 1] = y * 255 // max(height - 1, 1)
        clip[t, ..., 2] = (40 + 20 * t) % 256
        clip[t, 10:30, 8 + 8 * t : 28 + 8 * t] = (230, 30, 20)
    return clip


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    return make_clip()


@pytest.fixture(scope="module")
def odd_clip() -> np.ndarray:
    return make_clip(height=81, width=127)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# ---------------------------------------------------------------------------------------------
# Video encoders
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(80, 128), (81, 127)])
def test_mp4_roundtrip_probe_and_padding(tmp_path, size):
    height, width = size
    frames = make_clip(height=height, width=width)
    metadata = {"title": "Cat — 猫", "description": "two\nlines"}
    path = write_mp4(frames, tmp_path / "clip.mp4", fps=4, metadata=metadata)
    assert path == tmp_path / "clip.mp4"
    assert leftovers(tmp_path) == ["clip.mp4"]  # no temporary files left behind

    decoded = read_video_frames(path)
    even_h, even_w = height + height % 2, width + width % 2
    assert decoded.shape == (T, even_h, even_w, 3)
    assert decoded.dtype == np.uint8
    diff = np.abs(decoded[:, :height, :width].astype(np.int16) - frames.astype(np.int16))
    assert diff.mean() < 3.0
    if height % 2:  # the padded row replicates the last row (never a rescale)
        pad_diff = np.abs(decoded[:, -1, :width].astype(np.int16) - frames[:, -1].astype(np.int16))
        assert pad_diff.mean() < 6.0

    info = probe_video(path, count_frames=True)
    assert info["codec"] == "h264"
    assert info["profile"] == "High"
    assert info["pix_fmt"] == "yuv420p"
    assert "bt709" in info["color"]
    assert (info["width"], info["height"]) == (even_w, even_h)
    assert info["fps"] == pytest.approx(4.0)
    assert info["duration"] == pytest.approx(T / 4, abs=0.05)
    assert info["frames"] == T
    assert info["comment"] == SYNTHETIC_COMMENT
    assert info["title"] == "Cat — 猫"
    assert info["description"] == "two\nlines"

    data = path.read_bytes()  # +faststart: the index (moov) precedes the media data (mdat)
    assert 0 <= data.find(b"moov") < data.find(b"mdat")


def test_mp4_keeps_caller_comment_after_the_synthetic_note(tmp_path, clip):
    path = write_mp4(clip[:2], tmp_path / "c.mp4", metadata={"comment": "seed 123"})
    comment = probe_video(path)["comment"]
    assert comment.startswith(SYNTHETIC_COMMENT)
    assert comment.endswith("seed 123")


def test_mp4_accepts_lists_gray_frames_and_fractional_fps(tmp_path, clip):
    gray = [frame[..., 1] for frame in clip[:3]]  # HxW gray frames are stacked to RGB
    path = write_mp4(gray, tmp_path / "g.mp4", fps=2.5)
    decoded = read_video_frames(path)
    assert decoded.shape == (3, 80, 128, 3)
    assert probe_video(path)["fps"] == pytest.approx(2.5)


def test_mp4_rejects_lossless_crf(tmp_path, clip):
    with pytest.raises(ValueError, match="crf"):
        write_mp4(clip, tmp_path / "x.mp4", crf=0)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("fixture", ["clip", "odd_clip"])
def test_webm_roundtrip(tmp_path, request, fixture):
    frames = request.getfixturevalue(fixture)
    path = write_webm(frames, tmp_path / "clip.webm", fps=4, metadata={"title": "t"})
    decoded = read_video_frames(path)
    height, width = frames.shape[1:3]
    assert decoded.shape == (T, height + height % 2, width + width % 2, 3)
    assert np.abs(decoded[:, :height, :width].astype(np.int16) - frames.astype(np.int16)).mean() < 4.0
    info = probe_video(path)
    assert info["codec"] == "vp9"
    assert info["pix_fmt"] == "yuv420p"
    assert info["comment"] == SYNTHETIC_COMMENT
    assert info["title"] == "t"
    assert leftovers(tmp_path) == ["clip.webm"]


# ---------------------------------------------------------------------------------------------
# GIF and ZIP
# ---------------------------------------------------------------------------------------------


def test_gif_frames_loop_durations_and_comment(tmp_path, odd_clip):
    path = write_gif(odd_clip, tmp_path / "clip.gif", fps=4)
    with Image.open(path) as gif:
        assert gif.n_frames == T
        assert gif.size == (127, 81)  # GIFs keep the exact size
        assert gif.info["loop"] == 0
        assert SYNTHETIC_COMMENT.encode() in gif.info.get("comment", b"")
        durations = [frame.info["duration"] for frame in ImageSequence.Iterator(gif)]
        gif.seek(4)
        middle = np.asarray(gif.convert("RGB"))
    assert durations == [250] * T
    assert np.abs(middle.astype(np.int16) - odd_clip[4].astype(np.int16)).mean() < 8.0


def test_gif_fractional_fps_keeps_total_length_and_loop_none_plays_once(tmp_path, clip):
    path = write_gif(clip, tmp_path / "slow.gif", fps=3, loop=None)
    with Image.open(path) as gif:
        durations = [frame.info["duration"] for frame in ImageSequence.Iterator(gif)]
        assert "loop" not in gif.info
    assert len(durations) == T
    assert sum(durations) == 3000  # 9 frames at 3 fps, despite centisecond delays
    assert set(durations) <= {330, 340}


def test_png_zip_is_lossless_and_named(tmp_path, odd_clip):
    path = write_png_zip(odd_clip, tmp_path / "frames.zip")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        assert names == [f"frame_{i:04d}.png" for i in range(T)]
        assert archive.testzip() is None
        assert archive.comment.decode() == SYNTHETIC_COMMENT
        for i, name in enumerate(names):
            with archive.open(name) as handle, Image.open(handle) as image:
                assert image.mode == "RGB"
                assert image.info.get("Comment") == SYNTHETIC_COMMENT
                assert np.array_equal(np.asarray(image), odd_clip[i])


def test_png_zip_widens_the_index_for_many_frames(tmp_path):
    frames = np.zeros((10_001, 1, 1, 3), dtype=np.uint8)
    path = write_png_zip(frames, tmp_path / "many.zip", prefix="step")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    assert names[0] == "step_00000.png" and names[-1] == "step_10000.png"
    assert len(names) == 10_001


# ---------------------------------------------------------------------------------------------
# Sidecar
# ---------------------------------------------------------------------------------------------


class FakeDtype:
    def __str__(self) -> str:
        return "torch.float16"


class FakeTensor:
    shape = (2,)

    def numel(self) -> int:
        return 2

    def tolist(self) -> list[float]:
        return [0.5, 1.5]


def test_sidecar_roundtrip_with_awkward_values(tmp_path):
    cyclic: list = [1]
    cyclic.append(cyclic)
    settings = {
        "prompt": "1girl, ünïcode — 猫",
        "seed": np.int64(12345),
        "cfg": np.float32(1.5),
        "flag": np.bool_(True),
        "mask": np.arange(4, dtype=np.uint8),
        "input": Path("/data/in.png"),
        "size": (512, 320),
        "nested": {"steps": (1, (2, 3)), 7: "int key"},
        "tags": {"b", "a"},
        "nan": float("nan"),
        "dtype": FakeDtype(),
        "tensor": FakeTensor(),
        "when": dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc),
        "opaque": object(),
        "cyclic": cyclic,
        "synthetic": False,  # the exporter owns this key
    }
    path = write_sidecar(tmp_path / "run.json", settings)
    text = path.read_text(encoding="utf-8")
    assert "ünïcode — 猫" in text  # ensure_ascii=False
    data = json.loads(text)
    assert data["prompt"] == "1girl, ünïcode — 猫"
    assert data["seed"] == 12345 and data["cfg"] == 1.5 and data["flag"] is True
    assert data["mask"] == [0, 1, 2, 3]
    assert data["input"] == "/data/in.png"
    assert data["size"] == [512, 320]
    assert data["nested"] == {"steps": [1, [2, 3]], "7": "int key"}
    assert data["tags"] == ["a", "b"]
    assert data["nan"] == "nan"
    assert data["dtype"] == "torch.float16"
    assert data["tensor"] == [0.5, 1.5]
    assert data["when"] == "2024-01-02T03:04:05+00:00"
    assert data["opaque"].startswith("<object object")
    assert data["cyclic"][0] == 1 and isinstance(data["cyclic"][1], str)
    assert data["synthetic"] is True
    assert data["generator"] == "paints-undo"
    created = dt.datetime.fromisoformat(data["created"])
    assert created.utcoffset() == dt.timedelta(0)
    assert data["versions"]["numpy"] == np.__version__
    keys = list(data)
    assert keys == sorted(keys)  # sort_keys
    assert text.startswith('{\n  "')  # indent 2
    assert leftovers(tmp_path) == ["run.json"]


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------


def test_unique_output_stem_format():
    stem = unique_output_stem("demo")
    prefix, stamp, token = stem.split("_")
    assert prefix == "demo"
    assert len(stamp) == 15 and stamp[8] == "-"
    assert len(token) == 12 and int(token, 16) >= 0
    assert len({unique_output_stem() for _ in range(1000)}) == 1000
    with pytest.raises(ValueError):
        unique_output_stem("../evil")


def test_reserve_output_path_is_collision_free_across_threads(tmp_path):
    barrier = threading.Barrier(50)

    def reserve(i: int) -> Path:
        if i < 50:
            barrier.wait()  # maximise contention on the very same name
        return reserve_output_path(tmp_path, "same", ".mp4")

    with ThreadPoolExecutor(max_workers=50) as pool:
        paths = list(pool.map(reserve, range(200)))
    assert len(set(paths)) == 200
    assert all(p.is_file() and p.parent == tmp_path and p.suffix == ".mp4" for p in paths)
    assert (tmp_path / "same.mp4") in paths
    assert len(list(tmp_path.iterdir())) == 200


def test_reserve_output_path_normalises_suffix_and_rejects_separators(tmp_path):
    assert reserve_output_path(tmp_path / "new", "a", "gif") == tmp_path / "new" / "a.gif"
    with pytest.raises(ValueError):
        reserve_output_path(tmp_path, "sub/dir", ".mp4")


# ---------------------------------------------------------------------------------------------
# export_all
# ---------------------------------------------------------------------------------------------


def test_export_all_writes_every_format_and_sidecar(tmp_path, odd_clip):
    out = tmp_path / "results" / "nested"
    settings = {"seed": np.int64(7), "steps": 50}
    paths = export_all(
        odd_clip, out, fps=4, formats=("mp4", "webm", "gif", "zip"), settings=settings, metadata={"title": "run"}
    )
    assert set(paths) == {"mp4", "webm", "gif", "zip", "json"}
    stems = {p.stem for p in paths.values()}
    assert len(stems) == 1 and next(iter(stems)).startswith("paints_undo_")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths.values())
    assert all(p.stat().st_size > 0 for p in paths.values())
    data = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert data["seed"] == 7 and data["steps"] == 50 and data["synthetic"] is True
    assert data["export"]["num_frames"] == T
    assert (data["export"]["width"], data["export"]["height"]) == (127, 81)
    assert data["export"]["files"] == {k: v.name for k, v in paths.items() if k != "json"}
    assert probe_video(paths["mp4"])["title"] == "run"


def test_export_all_never_overwrites_an_existing_stem(tmp_path, clip):
    first = export_all(clip[:2], tmp_path, stem="mine", formats="gif")
    second = export_all(clip[:2], tmp_path, stem="mine", formats=["GIF", ".gif"])
    assert first["gif"] == tmp_path / "mine.gif"
    assert second["gif"] != first["gif"] and second["gif"].name.startswith("mine_")
    third = export_all(clip[:2], tmp_path, stem="mine", formats="gif", overwrite=True)
    assert third["gif"] == first["gif"]
    both = export_all(clip[:2], tmp_path / "two", stem="x", formats="mp4, zip")
    assert set(both) == {"mp4", "zip"}


def test_export_all_unknown_format(tmp_path, clip):
    with pytest.raises(ValueError, match="mp4, webm, gif, zip"):
        export_all(clip, tmp_path, formats=("mp4", "avi"))
    assert leftovers(tmp_path) == []


def test_failing_encoder_leaves_no_file_under_the_final_name(tmp_path, clip, monkeypatch):
    calls = {"n": 0}
    original = export._frame_bytes

    def flaky(frame):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated crash midway")
        return original(frame)

    monkeypatch.setattr(export, "_frame_bytes", flaky)
    target = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError, match="midway"):
        write_mp4(clip, target)
    assert leftovers(tmp_path) == []

    target.write_bytes(b"previous result")  # an existing file is left untouched
    calls["n"] = 0
    with pytest.raises(RuntimeError, match="midway"):
        write_webm(clip, target)
    assert leftovers(tmp_path) == ["out.mp4"] and target.read_bytes() == b"previous result"


def test_export_all_is_all_or_nothing(tmp_path, clip, monkeypatch):
    def broken_zip(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export, "write_png_zip", broken_zip)
    with pytest.raises(OSError, match="disk full"):
        export_all(clip, tmp_path, stem="run", formats=("gif", "zip"), settings={"a": 1})
    assert leftovers(tmp_path) == []  # the finished GIF and the reserved names are gone


def test_ffmpeg_failure_is_reported(tmp_path, clip, monkeypatch):
    monkeypatch.setattr(export, "_COLOR_TAGS", ["-colorspace", "not-a-colorspace"])
    with pytest.raises(ExportError, match="ffmpeg failed"):
        write_mp4(clip[:2], tmp_path / "bad.mp4")
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frames, message",
    [
        ([], "No frames"),
        (np.zeros((0, 8, 8, 3), np.uint8), "No frames"),
        (np.zeros((2, 8, 8, 3), np.float32), "uint8"),
        ([np.zeros((8, 8, 3), np.float64)], "uint8"),
        (np.zeros((2, 8, 8, 4), np.uint8), r"\(T, H, W, 3\)"),
        ([np.zeros((8, 8, 4), np.uint8)], "HxWx3"),
        (np.zeros((2, 8), np.uint8), r"\(T, H, W, 3\)"),
        ([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 10, 3), np.uint8)], "same size"),
        (np.zeros((80, 128, 3), np.uint8), "single HxWxC image"),
        ("frames/", "not a path"),
        (42, "sequence"),
    ],
)
def test_invalid_frames_raise_value_error(frames, message):
    with pytest.raises(ValueError, match=message):
        as_frames(frames)


@pytest.mark.parametrize("fps", [0, -4, float("nan"), float("inf"), True, "4"])
def test_invalid_fps(tmp_path, clip, fps):
    for writer, name in ((write_mp4, "a.mp4"), (write_webm, "a.webm"), (write_gif, "a.gif")):
        with pytest.raises(ValueError, match="fps"):
            writer(clip, tmp_path / name, fps=fps)
    with pytest.raises(ValueError, match="fps"):
        export_all(clip, tmp_path / "d", fps=fps)
    assert leftovers(tmp_path) == []


def test_invalid_metadata_and_nothing_to_export(tmp_path, clip):
    with pytest.raises(ValueError, match="Metadata key"):
        write_mp4(clip, tmp_path / "a.mp4", metadata={"bad key=": "x"})
    with pytest.raises(ValueError, match="Nothing to export"):
        export_all(clip, tmp_path, formats=())
    assert leftovers(tmp_path) == []


def test_read_and_probe_missing_or_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_video_frames(tmp_path / "missing.mp4")
    bogus = tmp_path / "bogus.mp4"
    bogus.write_bytes(b"not a video at all")
    with pytest.raises(ValueError):
        probe_video(bogus)


def test_as_frames_normalises_layouts():
    gray_stack = np.zeros((2, 6, 5), np.uint8)
    assert as_frames(gray_stack).shape == (2, 6, 5, 3)
    single_channel = np.zeros((2, 6, 5, 1), np.uint8)
    assert as_frames(single_channel).shape == (2, 6, 5, 3)
    pil_frames = [Image.new("RGB", (5, 6), (1, 2, 3))] * 2
    out = as_frames(pil_frames)
    assert out.shape == (2, 6, 5, 3) and out.flags.c_contiguous and out[0, 0, 0].tolist() == [1, 2, 3]
