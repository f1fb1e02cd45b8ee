"""Sketch mode: the chamfer distance, ranking, line-art extraction and ranked sketches on the tiny models."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from PIL import Image

from paints_undo import Cancelled, InvalidInputError, ModelManager, ModelSources, ModelsNotAvailableError
from paints_undo.keyframes import generate_keyframes
from paints_undo.sketch import (
    DETECTORS,
    SketchProgressEvent,
    chamfer_distance,
    extract_lineart,
    generate_sketches,
    ink_mask,
    rank_candidates,
    save_sketch_result,
    sketch_caption,
    sketch_file_name,
    validate_detectors,
    validate_sketch_settings,
)

STROKES = [((10, 10), (80, 20)), ((20, 70), (70, 40)), ((50, 10), (50, 85))]
OTHER_STROKES = [((5, 90), (90, 88)), ((85, 5), (88, 60)), ((15, 30), (35, 30))]


def drawing(strokes=STROKES, shift=(0, 0), size=(96, 96), rgb=False) -> np.ndarray:
    """Dark strokes on white paper (a synthetic line map)."""
    page = np.full(size, 255, np.uint8)
    dx, dy = shift
    for (x0, y0), (x1, y1) in strokes:
        cv2.line(page, (x0 + dx, y0 + dy), (x1 + dx, y1 + dy), 0, 2)
    return np.repeat(page[:, :, None], 3, axis=2) if rgb else page


def picture(h: int = 50, w: int = 36) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 7, yy * 5, 255 - xx * 3], -1).astype(np.uint8)
    cv2.circle(img, (w // 2, h // 2), min(h, w) // 3, (20, 20, 20), 2)
    return img


@pytest.fixture(scope="module")
def models(tiny_models_dir) -> ModelManager:
    return ModelManager(sources=ModelSources(models_dir=tiny_models_dir))


# -- distance ---------------------------------------------------------------------------------------------


def test_chamfer_distance_properties():
    ref = drawing()
    assert chamfer_distance(ref, ref) == 0.0
    assert chamfer_distance(ref, drawing(rgb=True)) == 0.0, "RGB and gray of the same strokes are identical"
    shifted, other = drawing(shift=(2, 2)), drawing(OTHER_STROKES)
    assert 0 < chamfer_distance(ref, shifted) < chamfer_distance(ref, other)
    assert chamfer_distance(ref, shifted) == pytest.approx(chamfer_distance(shifted, ref))
    assert chamfer_distance(ref, other) == pytest.approx(chamfer_distance(other, ref))
    blank = np.full_like(ref, 255)
    assert chamfer_distance(blank, ref) == 1.0 and chamfer_distance(ref, blank) == 1.0
    assert chamfer_distance(blank, blank) == 0.0
    with pytest.raises(ValueError, match="same size"):
        chamfer_distance(ref, ref[:50])


def test_faint_noise_is_not_ink():
    rng = np.random.default_rng(0)
    noisy_paper = (255 - rng.integers(0, 8, (64, 64, 3))).astype(np.uint8)
    assert not ink_mask(noisy_paper).any()
    assert chamfer_distance(noisy_paper, drawing(size=(64, 64))) == 1.0
    mask = ink_mask(drawing())
    assert mask.dtype == bool and 0 < mask.mean() < 0.2


def test_rank_candidates_puts_the_closer_candidate_first():
    ref = drawing()
    blank = np.full((96, 96, 3), 255, np.uint8)
    candidates = [drawing(OTHER_STROKES, rgb=True), drawing(shift=(2, 1), rgb=True), blank]
    ranking = rank_candidates(candidates, [ref])
    assert [i for _, i in ranking] == [1, 0, 2]
    assert ranking[-1][0] == 1.0
    assert [s for s, _ in ranking] == sorted(s for s, _ in ranking)
    # Scores sum over line maps; a map of another size is fitted to the candidates' frame first.
    bigger = cv2.resize(ref, (192, 192), interpolation=cv2.INTER_NEAREST)
    two = rank_candidates(candidates, [ref, bigger])
    assert [i for _, i in two] == [1, 0, 2] and two[0][0] > ranking[0][0]
    # Nearly-equal sizes (detectors round up to multiples of 4 or 16) are stretched, not cropped.
    assert rank_candidates(candidates[1:2], [cv2.resize(ref, (100, 104))])[0][0] < ranking[1][0]


def test_rank_candidates_with_a_callable_metric():
    calls = []

    def darkness(candidate: np.ndarray, line: np.ndarray) -> float:
        calls.append((candidate.shape, line.shape))
        return float(255 - candidate.mean())

    candidates = [np.full((8, 8, 3), v, np.uint8) for v in (10, 250, 120)]
    ranking = rank_candidates(candidates, [np.zeros((8, 8), np.uint8), np.zeros((16, 16), np.uint8)], darkness)
    assert [i for _, i in ranking] == [1, 2, 0]
    assert ranking[0][0] == pytest.approx(2 * 5.0)
    assert len(calls) == 6 and all(line == (8, 8) for _, line in calls)
    with pytest.raises(InvalidInputError, match="lpips"):
        rank_candidates(candidates, [np.zeros((8, 8), np.uint8)], "lpips")
    with pytest.raises(InvalidInputError, match="line-art map"):
        rank_candidates(candidates, [])


# -- validation --------------------------------------------------------------------------------------------


def test_validation_of_detectors_and_steps():
    assert validate_detectors("manga, anime,manga") == ["manga", "anime"]
    assert validate_sketch_settings(("900", 950, 950), 2.0, ["lineart"]) == ([900, 950], 2, ["lineart"])
    for bad in (["pencil"], [], "", None):
        with pytest.raises(InvalidInputError, match="detector"):
            validate_detectors(bad)
    for steps in ([], [1000], [-1], ["x"], [950.5], "950"):
        with pytest.raises(InvalidInputError, match="[Ss]ketch step"):
            validate_sketch_settings(steps, 1, ["lineart"])
    for sets in (0, 101, "two", 1.5):
        with pytest.raises(InvalidInputError, match="sets"):
            validate_sketch_settings([950], sets, ["lineart"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(detectors=["pencil"]), "Unknown line-art detector"),
    (dict(detectors=[]), "at least one line-art detector"),
    (dict(sketch_steps=[]), "at least one sketch step"),
    (dict(sketch_steps=[1200]), "between 0 and 999"),
    (dict(num_sets=0), "between 1 and"),
    (dict(width=60), "multiple of 8"),
])
def test_bad_settings_fail_before_any_model_loads(tmp_path, kwargs, match):
    empty = ModelManager(sources=ModelSources(models_dir=tmp_path / "empty"))  # loading anything would fail
    args = dict(sketch_steps=[950], num_sets=1, width=64, height=64, steps=1, detectors=["lineart"])
    with pytest.raises(InvalidInputError, match=match):
        generate_sketches(picture(), "x", models=empty, **{**args, **kwargs})
    if "detectors" in kwargs:
        with pytest.raises(InvalidInputError, match=match):
            extract_lineart(picture(), kwargs["detectors"], models=empty)


# -- line art -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, size", [("manga", (64, 48)), ("anime", (50, 36)), ("lineart", (52, 36)),
                                        ("lineart_coarse", (52, 36))])
def test_extract_lineart_sizes(models, name, size):
    maps = extract_lineart(picture(50, 36), [name], models=models)
    assert list(maps) == [name]
    line = maps[name]
    assert line.dtype == np.uint8 and line.shape == size and line.flags.c_contiguous


def test_extract_lineart_odd_inputs(models, tmp_path):
    rgb = picture(50, 36)
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    from_gray = extract_lineart(gray, ["lineart"], models=models)["lineart"]
    from_rgb = extract_lineart(np.repeat(gray[:, :, None], 3, 2), ["lineart"], models=models)["lineart"]
    assert np.array_equal(from_gray, from_rgb)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    rgba[:10, :, 3] = 0  # transparent rows read as white paper
    line = extract_lineart(rgba, "lineart", models=models)["lineart"]
    assert line.shape == (52, 36)
    tiny = tmp_path / "dot.png"
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(tiny)
    maps = extract_lineart(str(tiny), ["lineart", "manga"], models=models)
    assert maps["lineart"].shape == (4, 4) and maps["manga"].shape == (16, 16)
    assert all(m.dtype == np.uint8 for m in maps.values())


@pytest.mark.parametrize("mode, offloaded", [("normal", True), ("high", False)])
def test_detectors_are_offloaded_unless_high_vram(tiny_models_dir, monkeypatch, mode, offloaded):
    import lineart_models

    unloaded = []
    monkeypatch.setattr(lineart_models.LineartDetector, "unload", lambda self: unloaded.append(self))
    manager = ModelManager(sources=ModelSources(models_dir=tiny_models_dir), vram_mode=mode)
    extract_lineart(picture(16, 16), ["lineart"], models=manager)
    assert bool(unloaded) == offloaded


@pytest.mark.parametrize("name", ["manga", "lineart_coarse"])
def test_missing_lineart_weights_name_the_file(tmp_path, monkeypatch, name):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("PAINTS_UNDO_LINEART_DIR", raising=False)
    empty = ModelManager(sources=ModelSources(models_dir=tmp_path / "empty"))
    with pytest.raises(ModelsNotAvailableError) as info:
        extract_lineart(picture(16, 16), [name], models=empty)
    message = str(info.value)
    assert {"manga": "erika.pth", "lineart_coarse": "sk_model2.pth"}[name] in message
    assert "HF_HUB_OFFLINE" in message and "\n" not in message


# -- ranked sketches end to end -----------------------------------------------------------------------------


TINY = dict(sketch_steps=[950, 999], num_sets=2, seed=7, width=64, height=64, steps=1, detectors=["lineart"])


@pytest.fixture(scope="module")
def sketch_run(models):
    events = []
    result = generate_sketches(picture(), "x", models=models, progress=events.append, **TINY)
    return result, events


def test_generate_sketches_ranks_both_sets(sketch_run, models):
    result, events = sketch_run
    assert len(result.sketches) == len(result.scores) == len(result.origins) == 4
    assert result.scores == sorted(result.scores)
    assert sorted(result.origins) == [(7, 950), (7, 999), (8, 950), (8, 999)]
    assert all(s.shape == (64, 64, 3) and s.dtype == np.uint8 for s in result.sketches)
    assert list(result.line_art) == ["lineart"] and result.line_art["lineart"].shape == (64, 64)
    assert result.cropped_input.shape == (64, 64, 3)
    maps = list(result.line_art.values())
    assert [s for s, _ in rank_candidates(result.sketches, maps)] == pytest.approx(result.scores)
    for sketch, score in zip(result.sketches, result.scores):
        assert rank_candidates([sketch], maps)[0][0] == pytest.approx(score)
    assert result.settings["sketch_steps"] == [950, 999] and result.settings["metric"] == "chamfer"
    # Each set is exactly the keyframes of its seed.
    frames = generate_keyframes(picture(), "x", [950, 999], 64, 64, 8, 1, models=models)
    assert np.array_equal(result.sketches[result.origins.index((8, 999))], frames[2])
    assert np.array_equal(result.cropped_input, frames[0])
    stages = {(e.stage, e.segment) for e in events}
    assert {("lineart", None), ("sketches", 0), ("sketches", 1)} <= stages
    assert all(isinstance(e, SketchProgressEvent) for e in events)
    assert "set 2/2" in [e for e in events if e.segment == 1][0].description


def test_generate_sketches_can_be_cancelled(models):
    with pytest.raises(Cancelled):
        generate_sketches(picture(), "x", models=models, cancel=lambda: True, **TINY)


def test_save_sketch_result(sketch_run, tmp_path):
    result, _ = sketch_run
    (tmp_path / "sketches").mkdir()
    (tmp_path / "sketches" / "rank_07_seed1_step1.png").write_bytes(b"stale")
    outputs = save_sketch_result(result, tmp_path, {"input": "picture.png"})
    files = sorted(p.name for p in outputs["sketches"].iterdir())
    assert files == [sketch_file_name(r, *o) for r, o in enumerate(result.origins)]
    assert files[0].startswith("rank_00_seed") and (tmp_path / "lineart" / "lineart.png").is_file()
    doc = json.loads(outputs["json"].read_text())
    assert doc["input"] == "picture.png" and doc["synthetic"] is True and doc["metric"] == "chamfer"
    assert [s["score"] for s in doc["sketches"]] == pytest.approx(result.scores)
    assert [(s["seed"], s["step"]) for s in doc["sketches"]] == [tuple(o) for o in result.origins]
    assert doc["line_art"] == {"lineart": "lineart/lineart.png"}
    saved = np.array(Image.open(tmp_path / doc["sketches"][0]["file"]))
    assert np.array_equal(saved, result.sketches[0])
    assert sketch_caption(0, 0.01234, (7, 950)) == "#1 score 0.0123 (seed 7, step 950)"
    assert sketch_file_name(3, 7, 950, count=120) == "rank_003_seed7_step950.png"
    assert set(DETECTORS) == {"manga", "anime", "lineart", "lineart_coarse"}
