"""wd14_tagger: exact prompts on the golden cases through the real onnxruntime path, model file
resolution, input validation and caching."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from PIL import Image

import wd14_tagger as W
from golden import GOLDEN, load_case

CASE, TENSORS = load_case("tagger")
TAGGER_DIR = GOLDEN / "tagger"
IMAGES = {e["name"]: e for e in CASE["inputs"]["images"]}
RESULTS = CASE["outputs"]["results"]
TOL = CASE["tolerance"]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    monkeypatch.delenv(W.MODEL_DIR_ENV, raising=False)
    W.clear_cache()
    yield
    W.clear_cache()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tagger")
    for name in (W.ONNX_FILENAME, W.CSV_FILENAME):
        shutil.copy(TAGGER_DIR / name, folder / name)
    return folder


def golden_input(name: str):
    """The input exactly as the reference received it (numpy array, PIL RGBA image or path)."""
    entry = IMAGES[name]
    path = TAGGER_DIR / entry["file"]
    if entry["kind"] == "path":
        return str(path)
    image = Image.open(path)
    if entry["kind"].startswith("PIL"):
        assert image.mode == "RGBA"
        return image
    array = np.array(image)
    assert list(array.shape) == [int(s) for s in entry["kind"].split("[")[1].rstrip("]").split(",")]
    return array


def _result(image: str, setting: int = 0) -> dict:
    return [r for r in RESULTS if r["image"] == image][setting]


# ---------------------------------------------------------------------------------------------
# Goldens
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "result", RESULTS, ids=lambda r: f"{r['image']}-t{r['threshold']}-c{r['character_threshold']}-x{bool(r['exclude_tags'])}"
)
def test_golden_prompt_exact(result, model_dir):
    got = W.default_interrogator(
        golden_input(result["image"]),
        threshold=result["threshold"],
        character_threshold=result["character_threshold"],
        exclude_tags=result["exclude_tags"],
        model_dir=model_dir,
    )
    assert got == result["prompt"]


def test_golden_prompts_via_env_var(model_dir, monkeypatch):
    monkeypatch.setenv(W.MODEL_DIR_ENV, str(model_dir))
    for result in RESULTS:
        got = W.default_interrogator(
            golden_input(result["image"]), result["threshold"], result["character_threshold"], result["exclude_tags"]
        )
        assert got == result["prompt"], result["image"]


@pytest.mark.parametrize("name", list(IMAGES))
def test_golden_probabilities_and_model_input(name, model_dir):
    labels, probs = W.predict_probabilities(golden_input(name), model_dir=model_dir)
    expected = TENSORS[name].numpy()
    assert probs.shape == expected.shape and len(labels.names) == expected.shape[0]
    np.testing.assert_allclose(probs, expected, rtol=TOL["rtol"], atol=TOL["atol"])
    model_input = W.preprocess(golden_input(name), 448)
    assert model_input.shape == (1, 448, 448, 3) and model_input.dtype == np.float32
    np.testing.assert_array_equal(model_input[0, ::8, ::8], TENSORS[f"{name}__input_stride8_uint8"].numpy())


# ---------------------------------------------------------------------------------------------
# Model files
# ---------------------------------------------------------------------------------------------


def test_missing_files_offline_gives_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(W.TaggerUnavailableError) as info:
        W.default_interrogator(np.zeros((8, 8, 3), np.uint8))
    message = str(info.value)
    assert "\n" not in message
    assert W.ONNX_FILENAME in message and W.CSV_FILENAME in message
    assert W.MODEL_DIR_ENV in message and "HF_HUB_OFFLINE" in message
    assert not any(p.name.startswith(W.MODEL_NAME) for p in tmp_path.iterdir())  # nothing written to the CWD


def test_model_dir_missing_one_file(tmp_path):
    shutil.copy(TAGGER_DIR / W.ONNX_FILENAME, tmp_path / W.ONNX_FILENAME)
    with pytest.raises(W.TaggerUnavailableError) as info:
        W.default_interrogator(np.zeros((8, 8, 3), np.uint8), model_dir=tmp_path)
    message = str(info.value)
    assert message.startswith(f"WD14 tagger file(s) {W.CSV_FILENAME} not found in ")
    assert "\n" not in message


def test_hub_download_used_without_folder(model_dir, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs.get("local_files_only", False)))
        return str(model_dir / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    result = _result("np_rgb_300x200")
    assert W.default_interrogator(golden_input("np_rgb_300x200")) == result["prompt"]
    assert calls == [(W.HUB_REPO_ID, W.ONNX_FILENAME, False), (W.HUB_REPO_ID, W.CSV_FILENAME, False)]


def test_hub_failure_checks_second_file_in_cache_only(monkeypatch):
    import huggingface_hub

    calls = []

    def failing_download(repo_id, filename, **kwargs):
        calls.append((filename, kwargs.get("local_files_only", False)))
        raise OSError("network unreachable")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", failing_download)
    with pytest.raises(W.TaggerUnavailableError, match="download failed") as info:
        W.resolve_model_files()
    assert calls == [(W.ONNX_FILENAME, False), (W.CSV_FILENAME, True)]
    assert W.ONNX_FILENAME in str(info.value) and W.CSV_FILENAME in str(info.value)


def test_corrupt_model_file(tmp_path):
    (tmp_path / W.ONNX_FILENAME).write_bytes(b"not an onnx model")
    shutil.copy(TAGGER_DIR / W.CSV_FILENAME, tmp_path / W.CSV_FILENAME)
    with pytest.raises(W.TaggerUnavailableError) as info:
        W.default_interrogator(np.zeros((8, 8, 3), np.uint8), model_dir=tmp_path)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def _text_file(tmp):
    p = tmp / "a.txt"
    p.write_text("no image here")
    return p


def _corrupt_png(tmp):
    p = tmp / "bad.png"
    p.write_bytes((TAGGER_DIR / "np_rgb_300x200.png").read_bytes()[:300])
    return p


@pytest.mark.parametrize(
    "make",
    [
        _text_file,
        _corrupt_png,
        lambda tmp: str(tmp / "missing.png"),
        lambda tmp: np.zeros((0, 4, 3), np.uint8),
        lambda tmp: np.zeros((4,), np.uint8),
        lambda tmp: np.zeros((2, 4, 4, 3), np.uint8),
        lambda tmp: np.zeros((4, 4, 7), np.uint8),
        lambda tmp: 42,
        lambda tmp: b"\x89PNG",
    ],
    ids=["text-file", "corrupt-png", "missing-path", "empty", "1d", "4d", "7-channels", "int", "bytes"],
)
def test_bad_inputs_raise_value_error(make, tmp_path, model_dir):
    with pytest.raises(ValueError) as info:
        W.default_interrogator(make(tmp_path), model_dir=model_dir)
    assert str(info.value) and "\n" not in str(info.value)


def test_sixteen_bit_inputs(model_dir):
    rgb = golden_input("np_rgb_300x200")
    deep = rgb.astype(np.uint16) * 257  # exactly representable: scales back to the same 8-bit data
    assert W.default_interrogator(deep, model_dir=model_dir) == _result("np_rgb_300x200")["prompt"]

    gray = golden_input("np_gray_200x260")
    pil16 = Image.fromarray(gray.astype(np.uint16) * 257)
    assert pil16.mode.startswith("I;16")
    assert W.default_interrogator(pil16, model_dir=model_dir) == _result("np_gray_200x260")["prompt"]


def test_palette_la_and_other_modes(model_dir, tmp_path):
    gray = golden_input("np_gray_200x260")
    la = Image.fromarray(np.stack([gray, np.full_like(gray, 255)], axis=2), "LA")
    assert W.default_interrogator(la, model_dir=model_dir) == _result("np_gray_200x260")["prompt"]

    rgb = Image.fromarray(golden_input("np_rgb_300x200"))
    for image in (
        rgb.convert("P", palette=Image.ADAPTIVE, colors=64),
        rgb.convert("CMYK"),
        rgb.convert("1"),
        Image.fromarray(gray.astype(np.float32) / 255.0, "F"),
        rgb.convert("P").convert("PA"),
        rgb.convert("RGBA").convert("RGBa"),
    ):
        prompt = W.default_interrogator(image, model_dir=model_dir)
        assert isinstance(prompt, str) and prompt, image.mode

    # Animated GIF: the first frame is tagged, whatever frame the object points at.
    frames = [Image.new("RGB", (64, 48), (255, 255, 255)), Image.new("RGB", (64, 48), (0, 0, 0))]
    gif = tmp_path / "anim.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=40)
    first = W.default_interrogator(np.array(frames[0]), model_dir=model_dir)
    assert W.default_interrogator(gif, model_dir=model_dir) == first
    opened = Image.open(gif)
    opened.seek(1)
    assert W.default_interrogator(opened, model_dir=model_dir) == first


def test_rgba_numpy_matches_rgba_pil(model_dir):
    pil = golden_input("pil_rgba_256x320_transparent_black_left")
    result = _result("pil_rgba_256x320_transparent_black_left")
    assert W.default_interrogator(np.array(pil), model_dir=model_dir) == result["prompt"]


# ---------------------------------------------------------------------------------------------
# Caching and import
# ---------------------------------------------------------------------------------------------


def test_session_and_labels_cached(model_dir, tmp_path, monkeypatch):
    created = []
    real = onnxruntime.InferenceSession

    def counting(*args, **kwargs):
        created.append(args[0] if args else kwargs.get("path_or_bytes"))
        return real(*args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", counting)
    read = []
    real_read = W._read_labels
    monkeypatch.setattr(W, "_read_labels", lambda p: read.append(p) or real_read(p))

    image = golden_input("np_rgb_448x448")
    first = W.default_interrogator(image, model_dir=model_dir)
    second = W.default_interrogator(image, model_dir=model_dir)
    assert first == second
    assert len(created) == 1 and len(read) == 1

    # Several threads racing on a cold cache still build one session.
    W.clear_cache()
    created.clear()
    outputs = []
    threads = [
        threading.Thread(target=lambda: outputs.append(W.default_interrogator(image, model_dir=model_dir)))
        for _ in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outputs == [first] * 6 and len(created) == 1

    # A different model folder gets its own session.
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    W.default_interrogator(image, model_dir=other)
    assert len(created) == 2


def test_import_creates_no_session_and_downloads_nothing(tmp_path):
    code = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
import onnxruntime, huggingface_hub
def boom(*a, **k):
    raise AssertionError("called at import")
onnxruntime.InferenceSession = boom
huggingface_hub.hf_hub_download = boom
import wd14_tagger
assert wd14_tagger._CACHE._sessions == {{}}
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    assert list(tmp_path.iterdir()) == []
