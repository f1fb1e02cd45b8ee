"""Device / dtype / offload policy, tested without a GPU (fake devices and monkeypatched memory)."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import memory_management as mm

GiB = mm.GiB
ROOT = Path(__file__).resolve().parent.parent


class RecordingModule(torch.nn.Module):
    """Records ``.to(device)`` calls instead of moving (there is no GPU to move to)."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.where = "cpu"
        self.moves: list[str] = []

    def to(self, *args, **kwargs):
        device = kwargs.get("device", args[0] if args else None)
        self.where = str(torch.device(device))
        self.moves.append(self.where)
        return self


def test_device_choice_order(monkeypatch, fake_cuda):
    assert mm.select_device() == torch.device("cuda")
    monkeypatch.setattr(mm, "_cuda_available", lambda: False)
    monkeypatch.setattr(mm, "_mps_available", lambda: True)
    assert mm.select_device() == torch.device("mps")
    monkeypatch.setattr(mm, "_mps_available", lambda: False)
    assert mm.select_device() == torch.device("cpu")


def test_preferred_device_and_env(monkeypatch):
    monkeypatch.setattr(mm, "_cuda_available", lambda: False)
    monkeypatch.setattr(mm, "_mps_available", lambda: False)
    assert mm.select_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        mm.select_device("cuda")
    monkeypatch.setenv("PAINTS_UNDO_DEVICE", "cuda")
    with pytest.raises(ValueError, match="--device cpu"):
        mm.select_device()


def test_dtypes_follow_the_original_on_cuda(fake_cuda):
    cuda = torch.device("cuda")
    assert mm.dtype_for("sf_unet", cuda) == torch.float16
    assert mm.dtype_for("sf_text_encoder", cuda) == torch.float16
    assert mm.dtype_for("sf_vae", cuda) == torch.bfloat16
    assert mm.dtype_for("mf_unet", cuda) == torch.float16
    assert mm.dtype_for("mf_vae", cuda) == torch.float16
    assert mm.dtype_for("lineart", cuda) == torch.float32


def test_bf16_where_fp16_is_unsupported_and_fp16_where_bf16_is(fake_cuda):
    cuda = torch.device("cuda")
    fake_cuda["capability"] = (5, 2)  # Maxwell: no fast fp16
    assert mm.dtype_for("sf_unet", cuda) == torch.bfloat16
    fake_cuda["capability"] = (7, 5)  # Turing: fp16 but no bf16
    fake_cuda["bf16"] = False
    assert mm.dtype_for("sf_vae", cuda) == torch.float16


def test_fp32_on_cpu():
    for component in ("sf_unet", "sf_vae", "mf_unet", "mf_image_encoder"):
        assert mm.dtype_for(component, torch.device("cpu")) == torch.float32


@pytest.mark.parametrize("free_gib, mode", [(40, "high"), (22, "high"), (16, "normal"), (10, "normal"), (6, "low")])
def test_vram_mode_from_free_memory(fake_cuda, free_gib, mode):
    fake_cuda["free"] = free_gib * GiB
    assert mm.decide_vram_mode(torch.device("cuda")) == mode


@pytest.mark.parametrize("free_gib, mode, batched", [(40, "high", True), (12, "normal", True), (8, "low", True),
                                                     (6, "low", False), (3, "low", False)])
def test_guidance_branches_are_batched_where_memory_allows(fake_cuda, free_gib, mode, batched):
    fake_cuda["free"] = free_gib * GiB
    manager = mm.MemoryManager.create()
    assert (manager.vram_mode, manager.batch_cfg_default) == (mode, batched)
    # A forced low mode on a large GPU keeps the single call: the 6 GiB budget holds either way.
    fake_cuda["free"] = 40 * GiB
    assert mm.MemoryManager.create(vram_mode="low").batch_cfg_default
    assert not mm.MemoryManager.create(device="cpu").batch_cfg_default


def test_segments_are_sampled_together_only_in_high_mode_and_as_far_as_memory_holds(fake_cuda):
    cpu = torch.device("cpu")
    assert mm.MemoryManager(device=cpu, vram_mode="high").video_segment_batch(7) == 7
    assert mm.MemoryManager(device=cpu, vram_mode="high").video_segment_batch(0) == 1
    assert mm.MemoryManager(device=cpu, vram_mode="high").video_segment_batch() == 1  # no gain on a CPU
    assert mm.MemoryManager(device=cpu, vram_mode="normal").video_segment_batch(7) == 1
    assert mm.MemoryManager(device=cpu, vram_mode="low").video_segment_batch(7) == 1
    # On a GPU: a 24 GB card (22.5 GiB free) holds 3 segments at once, an 80 GB one all 7 (and more:
    # unasked, as many as memory holds).
    for free_gib, expected, unasked in ((22.5, 3, 3), (79, 7, 28), (16, 1, 1)):
        fake_cuda["free"] = int(free_gib * GiB)
        manager = mm.MemoryManager.create(vram_mode="high")
        assert manager.video_segment_batch(7) == expected, free_gib
        assert manager.video_segment_batch() == unasked, free_gib
        assert manager.video_segment_batch(1) == 1
    fake_cuda["free"] = 79 * GiB
    assert mm.MemoryManager.create(vram_mode="normal").video_segment_batch(7) == 1
    assert mm.MemoryManager.create(vram_mode="normal").video_segment_batch() == 1


def test_video_unet_runs_channels_last_on_cuda_gpus_from_volta_on(fake_cuda):
    assert mm.MemoryManager.create().video_unet_channels_last
    fake_cuda["capability"] = (6, 1)  # Pascal: its cuDNN convolutions are channels-first
    assert not mm.MemoryManager.create().video_unet_channels_last
    assert not mm.MemoryManager.create(device="cpu").video_unet_channels_last


def test_forced_vram_mode_and_cpu_default(fake_cuda):
    fake_cuda["free"] = 1 * GiB
    assert mm.decide_vram_mode(torch.device("cuda"), "high") == "high"
    assert mm.decide_vram_mode(torch.device("cpu")) == "high"
    with pytest.raises(ValueError, match="Unknown VRAM mode"):
        mm.decide_vram_mode(torch.device("cuda"), "huge")


def test_decision_is_logged_once_per_manager(fake_cuda, caplog):
    with caplog.at_level(logging.INFO, logger="memory_management"):
        manager = mm.MemoryManager.create()
        a, b = RecordingModule("a"), RecordingModule("b")
        manager.load_models_to_gpu(a)
        manager.load_models_to_gpu(b)
    decisions = [r for r in caplog.records if "VRAM mode" in r.getMessage()]
    assert len(decisions) == 1 and "high" in decisions[0].getMessage()


def test_normal_mode_keeps_one_stage_resident(fake_cuda):
    manager = mm.MemoryManager(device=torch.device("cuda"), vram_mode="normal")
    vae, text, unet = RecordingModule("vae"), RecordingModule("text"), RecordingModule("unet")
    manager.load_models_to_gpu(vae)
    assert vae.where == "cuda:0" or vae.where == "cuda"
    manager.load_models_to_gpu([text, unet])
    assert vae.where == "cpu" and text.where.startswith("cuda") and unet.where.startswith("cuda")
    assert manager.resident_models == [text, unet]
    # Already resident models are not moved again.
    moves = len(unet.moves)
    manager.load_models_to_gpu(unet)
    assert len(unet.moves) == moves and text.where == "cpu"
    manager.unload_all_models([vae])
    assert all(m.where == "cpu" for m in (vae, text, unet)) and manager.resident_models == []


def test_high_mode_keeps_everything_resident(fake_cuda):
    manager = mm.MemoryManager(device=torch.device("cuda"), vram_mode="high")
    a, b = RecordingModule("a"), RecordingModule("b")
    manager.load_models_to_gpu(a)
    manager.load_models_to_gpu(b)
    assert a.where.startswith("cuda") and b.where.startswith("cuda")
    assert a.moves == [a.where]  # moved once, never offloaded between stages
    manager.unload_all_models()
    assert a.where == "cpu" and b.where == "cpu"


def test_real_modules_move_on_cpu():
    manager = mm.MemoryManager.create(device="cpu")
    layer = torch.nn.Linear(2, 2)
    manager.load_models_to_gpu(layer)
    assert manager.resident_models == [layer]
    manager.unload_all_models()
    assert next(layer.parameters()).device.type == "cpu"


def test_import_does_not_initialise_cuda():
    code = (
        "import torch\n"
        "def boom(*a, **k): raise AssertionError('CUDA touched at import')\n"
        "torch.cuda._lazy_init = boom; torch.cuda.init = boom; torch.cuda.is_available = boom\n"
        "import memory_management\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
