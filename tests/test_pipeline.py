"""Headless API: both end-to-end goldens through the production model manager, progress, cancel, bad inputs."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from golden import GOLDEN, assert_close, load_case, record

import paints_undo
from paints_undo import (
    Cancelled,
    InvalidInputError,
    ModelManager,
    ModelSources,
    ModelsNotAvailableError,
    generate_keyframes,
    generate_video,
    iter_video_segments,
)
from paints_undo.images import ImageLoadError
from paints_undo.video import assemble_video, parse_buckets

ROOT = Path(__file__).resolve().parent.parent
SMALL_BUCKETS = "80x128,96x112,112x96,128x80"


@pytest.fixture(scope="module")
def models(tiny_models_dir) -> ModelManager:
    return ModelManager(sources=ModelSources(models_dir=tiny_models_dir))


def _uint8_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


# -- sf_pipeline_e2e ---------------------------------------------------------------------------------


def test_sf_pipeline_e2e_golden(models, monkeypatch):
    case, t = load_case("sf_pipeline_e2e")
    inp = case["inputs"]
    sampler = models.single_frame().sampler
    seen = {}
    real_call = type(sampler).__call__

    def spy(self, **kwargs):
        seen.update(kwargs)
        seen["out"] = real_call(self, **kwargs)
        return seen["out"]

    monkeypatch.setattr(type(sampler), "__call__", spy)
    frames = generate_keyframes(
        GOLDEN / "sf_pipeline_e2e" / "input.png", inp["prompt"], inp["input_undo_steps"], inp["image_width"],
        inp["image_height"], inp["seed"], inp["steps"], inp["n_prompt"], inp["cfg"], models=models,
    )
    tol = case["tolerance"]
    assert len(frames) == case["outputs"]["keyframes"]["count"]
    assert all(f.shape == (640, 512, 3) and f.dtype == np.uint8 for f in frames)
    first = np.array(Image.open(GOLDEN / "sf_pipeline_e2e" / "keyframe_first.png").convert("RGB"))
    last = np.array(Image.open(GOLDEN / "sf_pipeline_e2e" / "keyframe_last.png").convert("RGB"))
    assert np.array_equal(frames[0], first)
    assert np.array_equal(frames[-1], last) and (last == 255).all()

    stack = np.stack(frames)
    atol = tol["keyframes_uint8_atol"]
    for name, got in (("keyframes_stride8", stack[:, ::8, ::8]), ("keyframes_center32", stack[:, 304:336, 240:272])):
        diff = _uint8_diff(got, t[name].numpy())
        record(f"sf_pipeline_e2e/{name}", diff, f"uint8 atol={atol}")
        assert diff <= atol, name
    means = torch.from_numpy(stack.reshape(len(frames), -1, 3).mean(axis=1).astype(np.float32))
    assert_close(means, t["keyframes_channel_mean"], {"rtol": 0, "atol": 0.05}, "sf_pipeline_e2e/keyframes_channel_mean")

    float_tol = {"rtol": tol["rtol"], "atol": tol["atol"]}
    assert_close(seen["cross_attention_kwargs"]["concat_conds"], t["concat_conds"], float_tol, "sf_pipeline_e2e/concat_conds")
    assert_close(seen["prompt_embeds"], t["prompt_embeds"], float_tol, "sf_pipeline_e2e/prompt_embeds")
    assert_close(seen["negative_prompt_embeds"], t["negative_prompt_embeds"], float_tol,
                 "sf_pipeline_e2e/negative_prompt_embeds")
    assert_close(seen["out"][[0, -1]], t["final_latents_first_last"], float_tol, "sf_pipeline_e2e/final_latents_first_last")


def test_keyframes_report_progress_and_can_be_cancelled(models):
    events = []
    image = np.full((40, 30, 3), 200, np.uint8)
    frames = generate_keyframes(image, "x", [500, 999], 64, 64, 1, 3, "", 3.0, models=models, progress=events.append)
    assert len(frames) == 4 and frames[1].shape == (64, 64, 3)
    assert [e.step for e in events if e.stage == "keyframes"] == [0, 1, 2, 3]

    stop = threading.Event()

    def progress(event):
        if event.step == 1:
            stop.set()

    with pytest.raises(Cancelled):
        generate_keyframes(image, "x", [500], 64, 64, 1, 5, "", 3.0, models=models, progress=progress, cancel=stop)


def test_keyframes_decode_one_at_a_time_in_low_vram(tiny_models_dir, monkeypatch):
    """low decodes each keyframe separately (the decoder's memory scales with the batch); same frames."""
    image = np.full((40, 30, 3), 120, np.uint8)
    image[10:30, 5:25] = (30, 160, 220)
    results, batches = {}, {}
    for mode in ("normal", "low"):
        manager = ModelManager(sources=ModelSources(models_dir=tiny_models_dir), vram_mode=mode)
        vae = manager.single_frame().vae
        sizes = batches[mode] = []
        real_decode = vae.decode
        monkeypatch.setattr(vae, "decode", lambda z, *a, **k: sizes.append(len(z)) or real_decode(z, *a, **k))
        results[mode] = generate_keyframes(image, "x", [400, 800, 999], 64, 64, 1, 2, "", 3.0, models=manager)
    assert batches == {"normal": [3], "low": [1, 1, 1]}
    assert max(_uint8_diff(a, b) for a, b in zip(results["normal"], results["low"])) <= 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(undo_steps=[]), "at least one"),
        (dict(undo_steps=[1000]), "between 0 and 999"),
        (dict(width=100), "multiple of 8"),
        (dict(steps=0), "Steps"),
        (dict(cfg=float("nan")), "CFG"),
        (dict(seed=-1), "seed"),
    ],
)
def test_bad_keyframe_settings_are_rejected_before_loading(kwargs, message):
    settings = dict(image=np.zeros((8, 8, 3), np.uint8), prompt="", undo_steps=[400], width=64, height=64, seed=0,
                    steps=1, negative_prompt="", cfg=3.0)
    settings.update(kwargs)
    never = ModelManager(sources=ModelSources(models_dir=Path("/nonexistent")))
    with pytest.raises(InvalidInputError, match=message):
        generate_keyframes(**settings, models=never)


# -- bad images ------------------------------------------------------------------------------------


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_bad_images_give_clear_errors(models, tmp_path):
    corrupt = _write(tmp_path, "corrupt.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    text = _write(tmp_path, "notes.png", b"this is not an image")
    for source in (corrupt, text, np.zeros((0, 5, 3), np.uint8), "missing-file.png"):
        with pytest.raises(ImageLoadError) as info:
            generate_keyframes(source, "", [400], 64, 64, 0, 1, "", 3.0, models=models)
        assert "\n" not in str(info.value)


def test_huge_image_is_rejected(models, tmp_path):
    from test_images import _png_claiming_size

    bomb = _write(tmp_path, "huge.png", _png_claiming_size(20_000, 20_000))
    with pytest.raises(ImageLoadError, match="too large"):
        generate_keyframes(bomb, "", [400], 64, 64, 0, 1, "", 3.0, models=models)


@pytest.mark.parametrize("kind", ["1x1", "rgba", "16bit", "gray", "animated_gif"])
def test_odd_images_are_handled(models, tmp_path, kind):
    if kind == "1x1":
        source = np.array([[[10, 200, 30]]], np.uint8)
    elif kind == "rgba":
        source = tmp_path / "a.png"
        Image.new("RGBA", (30, 20), (255, 0, 0, 0)).save(source)
    elif kind == "16bit":
        source = tmp_path / "b.png"
        Image.fromarray(np.full((20, 30), 40000, np.uint16)).save(source)
    elif kind == "gray":
        source = np.full((20, 30), 90, np.uint8)
    else:
        source = tmp_path / "c.gif"
        frames = [Image.new("RGB", (30, 20), c) for c in ((255, 0, 0), (0, 255, 0))]
        frames[0].save(source, save_all=True, append_images=frames[1:], duration=100, loop=0)
    frames = generate_keyframes(source, "", [999], 64, 64, 0, 1, "", 3.0, models=models)
    assert frames[0].shape == (64, 64, 3) and frames[0].dtype == np.uint8
    if kind == "rgba":
        assert (frames[0] == 255).all(), "transparent pixels become white paper"
    if kind == "animated_gif":
        assert tuple(frames[0][32, 32]) == (255, 0, 0), "first frame of an animation"


# -- mf_pipeline_e2e ---------------------------------------------------------------------------------


def test_mf_pipeline_e2e_golden(models, monkeypatch):
    case, t = load_case("mf_pipeline_e2e")
    cfg = case["config"]
    pipe = models.multi_frame().pipeline
    captured: dict[str, list] = {}

    def spy_method(name):
        real = getattr(pipe, name)

        def wrapper(*args, **kwargs):
            out = real(*args, **kwargs)
            captured.setdefault(name, []).append(out)
            return out

        monkeypatch.setattr(pipe, name, wrapper)

    for name in ("encode_cropped_prompt_77tokens", "encode_clip_vision", "encode_latents"):
        spy_method(name)
    real_call = type(pipe).__call__

    def call_spy(self, **kwargs):
        out = real_call(self, **kwargs)
        captured.setdefault("call", []).append((kwargs, out))
        return out

    monkeypatch.setattr(type(pipe), "__call__", call_spy)
    keyframes = [GOLDEN / "mf_pipeline_e2e" / f"keyframe_{i}.png" for i in range(cfg["n_keyframes"])]
    result = generate_video(keyframes, cfg["prompt"], cfg["steps"], cfg["cfg"], cfg["seed"],
                            buckets=cfg["buckets_used"], models=models)

    expected = t["output_frames_uint8"].numpy()
    assert result.frames.shape == expected.shape
    diff = _uint8_diff(result.frames, expected)
    atol = case["tolerance"]["output_frames_uint8"]["atol"]
    record("mf_pipeline_e2e/output_frames_uint8", diff, f"uint8 atol={atol}")
    assert diff <= atol

    tol = case["tolerance"]["float_tensors"]
    seg0_kwargs, seg0_latents = captured["call"][0]
    assert np.array_equal(np.stack(result.segments[0].cropped), t["seg0_cropped_images_uint8"].numpy())
    text = captured["encode_cropped_prompt_77tokens"]
    assert_close(text[0], t["seg0_positive_text_cond"], tol, "mf_pipeline_e2e/seg0_positive_text_cond")
    assert_close(text[1], t["seg0_negative_text_cond"], tol, "mf_pipeline_e2e/seg0_negative_text_cond")
    clip = captured["encode_clip_vision"]
    assert_close(clip[0], t["seg0_clip_vision_positive"], tol, "mf_pipeline_e2e/seg0_clip_vision_positive")
    assert_close(clip[1], t["seg0_clip_vision_negative"], tol, "mf_pipeline_e2e/seg0_clip_vision_negative")
    assert_close(seg0_kwargs["positive_image_cond"], t["seg0_positive_image_cond"], tol,
                 "mf_pipeline_e2e/seg0_positive_image_cond")
    assert_close(seg0_kwargs["negative_image_cond"], t["seg0_negative_image_cond"], tol,
                 "mf_pipeline_e2e/seg0_negative_image_cond")
    assert_close(captured["encode_latents"][0][0], t["seg0_input_frame_latents"], tol,
                 "mf_pipeline_e2e/seg0_input_frame_latents")
    assert_close(seg0_kwargs["concat_cond"], t["seg0_concat_cond"], tol, "mf_pipeline_e2e/seg0_concat_cond")
    assert_close(seg0_latents, t["seg0_latents"], tol, "mf_pipeline_e2e/seg0_latents")
    assert_close(captured["call"][1][1], t["seg1_latents"], tol, "mf_pipeline_e2e/seg1_latents")
    # Text conditions are computed once per run (same prompt in every segment).
    assert len(text) == 2


def test_mf_pipeline_e2e_golden_channels_last_in_low_vram(tiny_models_dir, monkeypatch):
    """The channels-last video UNet (the GPU default), with the group norms a GPU takes, gives the original's video."""
    from diffusers_vdm import normalization

    monkeypatch.setattr(normalization, "native_group_norm_keeps_channels_last", lambda device: False)
    case, t = load_case("mf_pipeline_e2e")
    cfg = case["config"]
    manager = ModelManager(sources=ModelSources(models_dir=tiny_models_dir), vram_mode="low", channels_last=True)
    keyframes = [GOLDEN / "mf_pipeline_e2e" / f"keyframe_{i}.png" for i in range(cfg["n_keyframes"])]
    result = generate_video(keyframes, cfg["prompt"], cfg["steps"], cfg["cfg"], cfg["seed"],
                            buckets=cfg["buckets_used"], models=manager)
    assert manager.multi_frame().pipeline.unet.channels_last
    diff = _uint8_diff(result.frames, t["output_frames_uint8"].numpy())
    record("mf_pipeline_e2e/output_frames_uint8 (channels-last, low VRAM)", diff, "uint8")
    assert diff <= case["tolerance"]["output_frames_uint8"]["atol"]


def test_mf_pipeline_e2e_golden_with_segments_sampled_together(tiny_models_dir):
    """Segment batching (high VRAM mode): both segments in one sampler batch give the original's video."""
    case, t = load_case("mf_pipeline_e2e")
    cfg = case["config"]
    manager = ModelManager(sources=ModelSources(models_dir=tiny_models_dir), vram_mode="high", segment_batch=4)
    assert manager.video_segment_batch == 4
    events = []
    keyframes = [GOLDEN / "mf_pipeline_e2e" / f"keyframe_{i}.png" for i in range(cfg["n_keyframes"])]
    calls = []
    pipe = manager.multi_frame().pipeline
    real_call = type(pipe).__call__

    def spy(self, **kwargs):
        calls.append(kwargs["concat_cond"].shape[0])
        return real_call(self, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(pipe), "__call__", spy)
        result = generate_video(keyframes, cfg["prompt"], cfg["steps"], cfg["cfg"], cfg["seed"],
                                buckets=cfg["buckets_used"], models=manager, progress=events.append)
    assert calls == [cfg["n_keyframes"] - 1], "one sampler run for all segments"
    diff = _uint8_diff(result.frames, t["output_frames_uint8"].numpy())
    record("mf_pipeline_e2e/output_frames_uint8 (segments sampled together)", diff, "uint8")
    assert diff <= case["tolerance"]["output_frames_uint8"]["atol"]
    video_events = [e for e in events if e.stage == "video"]
    assert video_events and all(e.together == (0, 1) for e in video_events)
    assert video_events[-1].description == f"Generating videos (1, 2 of 2 together): step {cfg['steps']}/{cfg['steps']}"


def test_segment_batches_share_a_bucket_and_skip_finished_segments():
    from paints_undo.video import _segment_groups

    wide, tall = np.zeros((300, 500, 3), np.uint8), np.zeros((500, 300, 3), np.uint8)
    buckets = parse_buckets(SMALL_BUCKETS)
    images = [wide, wide, wide, tall, tall, wide, wide]
    assert _segment_groups(images, range(6), 2, buckets) == [[0, 1], [2], [3, 4], [5]]
    assert _segment_groups(images, [0, 2, 5], 4, buckets) == [[0, 2, 5]]
    assert _segment_groups(images, range(6), 1, buckets) == [[i] for i in range(6)]


def test_segments_sampled_together_fall_back_to_one_at_a_time_when_memory_runs_out(tiny_models_dir, monkeypatch,
                                                                                    caplog):
    import paints_undo.video as video

    manager = ModelManager(sources=ModelSources(models_dir=tiny_models_dir), vram_mode="high", segment_batch=3)
    keyframes = [np.full((96, 112, 3), v, np.uint8) for v in (250, 180, 90, 20)]
    alone = list(iter_video_segments(keyframes, "p", 2, 7.5, 5, buckets=SMALL_BUCKETS,
                                     models=ModelManager(sources=ModelSources(models_dir=tiny_models_dir))))
    real = video.sample_segments

    def out_of_memory_when_batched(conditions, *args, **kwargs):
        if len(conditions) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return real(conditions, *args, **kwargs)

    monkeypatch.setattr(video, "sample_segments", out_of_memory_when_batched)
    with caplog.at_level("WARNING"):
        segments = list(iter_video_segments(keyframes, "p", 2, 7.5, 5, buckets=SMALL_BUCKETS, models=manager))
    assert [s.index for s in segments] == [0, 1, 2]
    assert "going on one at a time" in caplog.text
    for got, expected in zip(segments, alone):
        assert _uint8_diff(got.frames, expected.frames) <= 1


@pytest.mark.parametrize("mode, unet_loads, vae_loads", [("normal", 1, 1), ("low", 3, 4)])
def test_video_models_move_to_the_device_once_per_run_not_per_segment(tiny_models_dir, monkeypatch, mode,
                                                                     unet_loads, vae_loads):
    """Conditions are computed stage by stage over all segments, and in normal mode the UNet and VAE
    stay on the device together: each model moves once per run (low mode still gives each stage the
    device alone, so there the UNet comes back for each of the 3 segments)."""
    manager = ModelManager(sources=ModelSources(models_dir=tiny_models_dir), vram_mode=mode)
    pipe = manager.multi_frame().pipeline
    loads = {"unet": 0, "vae": 0, "image_encoder": 0, "text_encoder": 0}
    for name in loads:
        module = getattr(pipe, name)
        real_to = module.to

        def counting_to(*args, _name=name, _real=real_to, **kwargs):
            target = args[0] if args else kwargs.get("device")
            if target is not None and torch.device(target) == manager.memory.device and \
                    not any(m is getattr(pipe, _name) for m in manager.memory.resident_models):
                loads[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, "to", counting_to)
    keyframes = [np.full((96, 112, 3), v, np.uint8) for v in (250, 180, 90, 20)]
    segments = list(iter_video_segments(keyframes, "p", 2, 7.5, 5, buckets=SMALL_BUCKETS, models=manager))
    assert [s.index for s in segments] == [0, 1, 2]
    assert loads == {"unet": unet_loads, "vae": vae_loads, "image_encoder": 1, "text_encoder": 1}


def test_video_segments_stream_in_order_and_assemble_to_the_video(models):
    case, t = load_case("mf_pipeline_e2e")
    cfg = case["config"]
    keyframes = [np.array(Image.open(GOLDEN / "mf_pipeline_e2e" / f"keyframe_{i}.png")) for i in range(3)]
    events = []
    segments = list(iter_video_segments(keyframes, cfg["prompt"], cfg["steps"], cfg["cfg"], cfg["seed"],
                                        buckets=SMALL_BUCKETS, models=models, progress=events.append))
    assert [s.index for s in segments] == [0, 1] and [s.position for s in segments] == [1, 0]
    assert all(s.frames.shape == (15, 80, 128, 3) for s in segments)
    assert _uint8_diff(assemble_video(segments), t["output_frames_uint8"].numpy()) <= 1
    assert {(e.segment, e.step) for e in events} >= {(0, 3), (1, 3)}


def test_video_resume_skips_finished_segments_and_cancel_stops(models):
    keyframes = [np.full((60, 90, 3), v, np.uint8) for v in (250, 120, 30)]
    stop = threading.Event()

    def progress(event):
        if event.segment == 1 and event.step == 1:
            stop.set()

    got = []
    with pytest.raises(Cancelled):
        for seg in iter_video_segments(keyframes, "p", 2, 7.5, 5, buckets=SMALL_BUCKETS, models=models,
                                       progress=progress, cancel=stop):
            got.append(seg)
    assert [s.index for s in got] == [0]
    rest = list(iter_video_segments(keyframes, "p", 2, 7.5, 5, buckets=SMALL_BUCKETS, models=models, skip=[0]))
    assert [s.index for s in rest] == [1]
    full = generate_video(keyframes, "p", 2, 7.5, 5, buckets=SMALL_BUCKETS, models=models)
    assert np.array_equal(assemble_video(got + rest), full.frames)


def test_bad_video_inputs(models):
    frame = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(InvalidInputError, match="two keyframes"):
        generate_video([frame], models=models)
    with pytest.raises(InvalidInputError, match="HEIGHTxWIDTH"):
        parse_buckets("80by128")
    with pytest.raises(InvalidInputError, match="multiples of 16"):
        generate_video([frame, frame], "p", 1, 7.5, 0, buckets="72x128", models=models)
    with pytest.raises(InvalidInputError, match="steps"):
        generate_video([frame, frame], "p", 0, 7.5, 0, buckets=SMALL_BUCKETS, models=models)


# -- model manager ------------------------------------------------------------------------------------


def test_missing_models_give_one_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    manager = ModelManager(sources=ModelSources(models_dir=tmp_path))
    missing = manager.missing_models()
    assert set(missing) == {"single_frame", "multi_frame", "tagger", "lineart"}
    assert "erika.pth" in missing["lineart"]
    with pytest.raises(ModelsNotAvailableError) as info:
        generate_keyframes(np.zeros((8, 8, 3), np.uint8), "", [400], 64, 64, 0, 1, "", 3.0, models=manager)
    message = str(info.value)
    assert "paints_undo_single_frame" in message and str(tmp_path) in message and "HF_HUB_OFFLINE" in message
    assert "\n" not in message


def test_models_dir_env_var_and_lazy_single_load(tiny_models_dir, monkeypatch):
    monkeypatch.setenv("PAINTS_UNDO_MODELS_DIR", str(tiny_models_dir))
    manager = ModelManager()
    assert manager.missing_models() == {}
    assert manager._single is None and manager._multi is None
    first = manager.single_frame()
    assert manager.single_frame() is first
    assert first.origin.folder == str(tiny_models_dir / "paints_undo_single_frame")
    assert manager.tag(np.full((32, 32, 3), 128, np.uint8))  # the tiny tagger from the models folder


def test_import_loads_nothing_and_touches_no_gpu():
    code = (
        "import socket, torch\n"
        "def boom(*a, **k): raise AssertionError('touched at import')\n"
        "torch.cuda._lazy_init = boom; torch.cuda.init = boom\n"
        "socket.socket.connect = boom\n"
        "import paints_undo, paints_undo.cli, memory_management, wd14_tagger, single_frame, lineart_models\n"
        "import sys\n"
        "assert 'onnxruntime' not in sys.modules\n"
        "assert paints_undo.models._default_manager is None\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
