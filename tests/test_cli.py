"""``python -m paints_undo`` end to end on the tiny repositories: outputs, resume, failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from paints_undo import cli
from paints_undo.export import probe_video, read_video_frames

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--undo-steps", "999", "--steps", "1", "--width", "64", "--height", "64", "--video-steps", "1",
        "--video-buckets", "80x128,96x112,112x96,128x80", "-q"]


@pytest.fixture
def picture(tmp_path) -> Path:
    path = tmp_path / "my picture.png"
    yy, xx = np.mgrid[0:48, 0:40]
    Image.fromarray(np.stack([xx * 6, yy * 5, 255 - xx * 3], -1).astype(np.uint8)).save(path)
    return path


def _run(args, env_models: Path, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PAINTS_UNDO_MODELS_DIR=str(env_models))
    return subprocess.run([sys.executable, "-m", "paints_undo", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600, **kwargs)


def test_cli_end_to_end_writes_a_playable_mp4(tiny_models_dir, picture, tmp_path):
    out = tmp_path / "out"
    result = _run([str(picture), "-o", str(out), *FAST, "--formats", "mp4,zip"], tiny_models_dir)
    assert result.returncode == 0, result.stderr
    job = out / "my_picture"
    mp4 = job / "my_picture.mp4"
    assert f"mp4 -> {mp4}" in result.stdout
    frames = read_video_frames(mp4)
    # 3 keyframes (input, step 999, blank) -> 2 segments of 15 frames; square input -> 112x96 bucket.
    assert frames.shape == (30, 112, 96, 3)
    info = probe_video(mp4)
    assert info["codec"] == "h264" and info["pix_fmt"].startswith("yuv420p")
    # Lossless frames: the last pair's segment (ending at the blank canvas) comes first.
    segments = [np.load(job / "segments" / f"segment_{i:03d}.npz")["frames"] for i in (1, 0)]
    with zipfile.ZipFile(job / "my_picture.zip") as zf:
        names = sorted(zf.namelist())
        zipped = np.stack([np.array(Image.open(zf.open(n))) for n in names])
    assert np.array_equal(zipped, np.concatenate(segments))
    sidecar = json.loads((job / "my_picture.json").read_text())
    assert sidecar["keyframes"]["undo_steps"] == [999] and sidecar["video"]["seed"] == 123
    assert sidecar["keyframes"]["prompt"] == (job / "prompt.txt").read_text()  # from the tagger
    assert sidecar["synthetic"] is True and "single_frame" in sidecar["models"]
    assert len(list((job / "keyframes").glob("*.png"))) == 3


def _count_calls(monkeypatch, module, name, fail_at=None):
    calls = []
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        segments = kwargs.get("segments")
        calls.append(segments[0] if isinstance(segments, (list, tuple)) else kwargs.get("segment", len(calls)))
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_cli_resumes_after_interrupt(tiny_models_dir, picture, tmp_path, monkeypatch, capsys):
    import paints_undo.keyframes as keyframes
    import paints_undo.video as video

    monkeypatch.setenv("PAINTS_UNDO_MODELS_DIR", str(tiny_models_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    args = [str(picture), "-o", str(out), "--prompt", "a cat", *FAST]

    pairs = _count_calls(monkeypatch, video, "sample_segments", fail_at=2)
    assert cli.main(args) == 130
    assert "interrupted" in capsys.readouterr().err
    assert len(pairs) == 2
    segments = sorted(p.name for p in (out / "my_picture" / "segments").glob("*.npz"))
    assert segments == ["segment_000.npz"]

    monkeypatch.undo()
    monkeypatch.setenv("PAINTS_UNDO_MODELS_DIR", str(tiny_models_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    made_keyframes = _count_calls(monkeypatch, keyframes, "generate_keyframes")
    pairs = _count_calls(monkeypatch, video, "sample_segments")
    assert cli.main(args) == 0
    assert made_keyframes == [] and pairs == [1], "only the unfinished segment is computed again"
    resumed = read_video_frames(out / "my_picture" / "my_picture.mp4")

    fresh_out = tmp_path / "fresh"
    assert cli.main([str(picture), "-o", str(fresh_out), "--prompt", "a cat", *FAST]) == 0
    fresh = read_video_frames(fresh_out / "my_picture" / "my_picture.mp4")
    assert np.array_equal(resumed, fresh)

    # Other settings: cached segments are not reused.
    pairs.clear()
    assert cli.main(args[:-1] + ["-q", "--video-seed", "7"]) == 0
    assert pairs == [0, 1]
    assert [p.name for p in (out / "my_picture").glob("*.mp4")] == ["my_picture.mp4"], "a rerun replaces its result"


def test_cli_keyframes_only_then_user_keyframes(tiny_models_dir, picture, tmp_path, monkeypatch):
    monkeypatch.setenv("PAINTS_UNDO_MODELS_DIR", str(tiny_models_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    assert cli.main([str(picture), "-o", str(out), "--prompt", "x", "--keyframes-only", *FAST]) == 0
    kf_dir = out / "my_picture" / "keyframes"
    assert len(list(kf_dir.glob("*.png"))) == 3 and not list((out / "my_picture").glob("*.mp4"))
    assert cli.main(["--keyframes", str(kf_dir), "-o", str(out), *FAST]) == 0
    videos = list(out.glob("*_keyframes/*.mp4"))
    assert len(videos) == 1 and read_video_frames(videos[0]).shape[0] == 30


@pytest.mark.parametrize("case", ["missing", "corrupt", "no-args", "bad-buckets"])
def test_cli_failures_are_one_line_and_non_zero(tiny_models_dir, tmp_path, case, monkeypatch, capsys):
    monkeypatch.setenv("PAINTS_UNDO_MODELS_DIR", str(tiny_models_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if case == "missing":
        args = [str(tmp_path / "nope.png")]
    elif case == "corrupt":
        bad = tmp_path / "bad.png"
        bad.write_bytes(b"\x89PNG not really")
        args = [str(bad), "--prompt", "x"]
    elif case == "no-args":
        args = []
    else:
        args = [str(tmp_path), "--video-buckets", "big"]
    code = cli.main(args + ["-o", str(tmp_path / "o"), "-q"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code != 0 and len(err) == 1, err


def test_cli_missing_models_message(tmp_path, picture):
    result = _run([str(picture), "-o", str(tmp_path / "o"), "--prompt", "x", "-q"], tmp_path / "empty")
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "paints_undo_single_frame" in errors[0] and "Traceback" not in result.stderr


# -- sketch mode ------------------------------------------------------------------------------------------

SKETCH_FAST = ["--sketch", "--sketch-steps", "950,999", "--sketch-sets", "2", "--detectors", "lineart", "--steps", "1",
               "--width", "64", "--height", "64", "--prompt", "x", "-q"]


def test_cli_sketch_mode_writes_line_art_ranked_sketches_and_json(tiny_models_dir, picture, tmp_path):
    out = tmp_path / "out"
    result = _run([str(picture), "-o", str(out), *SKETCH_FAST, "--seed", "5"], tiny_models_dir)
    assert result.returncode == 0, result.stderr
    job = out / "my_picture"
    assert f"my_picture: json -> {job / 'sketches.json'}" in result.stdout
    line = np.array(Image.open(job / "lineart" / "lineart.png"))
    assert line.dtype == np.uint8 and line.shape == (64, 64)
    doc = json.loads((job / "sketches.json").read_text())
    names = sorted(p.name for p in (job / "sketches").glob("*.png"))
    assert names == sorted(s["file"].split("/")[-1] for s in doc["sketches"]) and len(names) == 4
    assert names[0].startswith("rank_00_seed") and doc["sketches"][0]["file"] == f"sketches/{names[0]}"
    assert {(s["seed"], s["step"]) for s in doc["sketches"]} == {(5, 950), (5, 999), (6, 950), (6, 999)}
    scores = [s["score"] for s in doc["sketches"]]
    assert scores == sorted(scores) and [s["rank"] for s in doc["sketches"]] == [0, 1, 2, 3]
    assert doc["settings"]["detectors"] == ["lineart"] and doc["settings"]["num_sets"] == 2
    assert doc["line_art"] == {"lineart": "lineart/lineart.png"} and "single_frame" in doc["models"]
    assert np.array(Image.open(job / doc["sketches"][0]["file"])).shape == (64, 64, 3)
    assert not list(job.glob("*.mp4")) and not (job / "segments").exists(), "sketch mode makes no video"


def test_cli_sketch_mode_resumes_and_rejects_bad_flags(tiny_models_dir, picture, tmp_path, monkeypatch, capsys):
    import paints_undo.sketch as sketch

    monkeypatch.setenv("PAINTS_UNDO_MODELS_DIR", str(tiny_models_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    args = [str(picture), "-o", str(out), *SKETCH_FAST]
    assert cli.main(args) == 0
    calls = _count_calls(monkeypatch, sketch, "generate_keyframes")
    assert cli.main(args) == 0 and calls == [], "an unchanged rerun reuses the sketches"
    next((out / "my_picture" / "sketches").glob("rank_01_*.png")).unlink()
    assert cli.main(args) == 0 and len(calls) == 2, "a deleted picture is made again"
    calls.clear()
    assert cli.main(args + ["--sketch-sets", "1"]) == 0 and len(calls) == 1
    assert len(list((out / "my_picture" / "sketches").glob("*.png"))) == 2, "stale ranks are removed"
    capsys.readouterr()

    for bad in (["--detectors", "pencil"], ["--sketch-steps", "1200"], ["--sketch-sets", "0"],
                ["--sketch-steps", ","], ["--keyframes", str(picture), str(picture)]):
        try:
            code = cli.main(args + bad)
        except SystemExit as exc:  # argparse rejects the flag itself
            code = exc.code
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")
               or ": error:" in line]
        assert code == 2 and len(err) == 1, (bad, err)


def test_cli_sketch_mode_missing_lineart_weights(tmp_path, picture, tiny_sf_repo):
    models = tmp_path / "models"
    models.mkdir()
    (models / "paints_undo_single_frame").symlink_to(tiny_sf_repo, target_is_directory=True)
    result = _run([str(picture), "-o", str(tmp_path / "o"), *SKETCH_FAST], models)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "sk_model.pth" in errors[0] and "Traceback" not in result.stderr


def test_speed_flags_default_to_the_memory_managers_choice(fake_cuda):
    """No flag: channels-last and segment batching follow the device (on for a large CUDA GPU in high
    mode); the flags force either way; a CPU keeps the original's layout and one segment at a time."""
    from paints_undo.cli import build_parser, model_manager_from_args

    parser = build_parser()
    base = ["in.png", "-o", "out"]
    fake_cuda["free"] = 79 * 2**30
    auto = model_manager_from_args(parser.parse_args(base + ["--vram-mode", "high"]))
    assert (auto.channels_last, auto.segment_batch) == (None, None)
    assert auto.use_channels_last and auto.video_segment_batch == 28
    forced = model_manager_from_args(parser.parse_args(
        base + ["--vram-mode", "high", "--no-channels-last", "--segment-batch", "2"]))
    assert not forced.use_channels_last and forced.video_segment_batch == 2
    normal = model_manager_from_args(parser.parse_args(base + ["--vram-mode", "normal", "--channels-last"]))
    assert normal.use_channels_last and normal.video_segment_batch == 1
    cpu = model_manager_from_args(parser.parse_args(base + ["--device", "cpu", "--vram-mode", "high"]))
    assert not cpu.use_channels_last and cpu.video_segment_batch == 1
