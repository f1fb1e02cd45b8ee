"""Shared pytest fixtures: materialized tiny repositories and a per-session results folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# Tests never reach a model hub: fail fast instead of retrying for ~24 s per call.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton's interpreter runs the fused kernels on the CPU (tests/test_fused_kernels.py). Triton reads
# the switch when it is imported (diffusers imports it), so it is set before anything else; the
# kernels still run only where a module's opt-in ``fused`` switch sends them.
os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from golden import materialize_repo  # noqa: E402

GIB = 1024**3


@pytest.fixture(scope="session")
def tiny_sf_repo(tmp_path_factory) -> Path:
    """The tiny single-frame repository with its derived weights written to disk."""
    return materialize_repo("paints_undo_single_frame", tmp_path_factory.mktemp("repos") / "paints_undo_single_frame")


@pytest.fixture(scope="session")
def tiny_mf_repo(tmp_path_factory) -> Path:
    """The tiny multi-frame repository with its derived weights written to disk."""
    return materialize_repo("paints_undo_multi_frame", tmp_path_factory.mktemp("repos") / "paints_undo_multi_frame")


@pytest.fixture(scope="session")
def lineart_weights_dir(tmp_path_factory) -> Path:
    """The four public line-art files (``sk_model.pth``, ``sk_model2.pth``, ``netG.pth``, ``erika.pth``)
    with the derived weights and seeds of the line-art golden cases; netG/erika carry a ``module.``
    prefix, as the goldens were produced."""
    import json

    import torch

    from golden import REFERENCE, derive_state_dict, load_case

    def layout(component: str) -> dict:
        return json.loads((REFERENCE / "keys" / f"{component}.json").read_text())["keys"]

    def prefixed(sd: dict) -> dict:
        return {f"module.{k}": v for k, v in sd.items()}

    root = tmp_path_factory.mktemp("annotators")
    for filename, seed in load_case("lineart_sk")[0]["seed"].items():
        torch.save(derive_state_dict(layout("lineart_sk"), seed), root / filename)
    seed = load_case("lineart_anime")[0]["seed"]["netG.pth"]
    torch.save(prefixed(derive_state_dict(layout("lineart_anime"), seed)), root / "netG.pth")
    seed = load_case("manga_line")[0]["seed"]["erika.pth"]
    torch.save(prefixed(derive_state_dict(layout("manga_line"), seed)), root / "erika.pth")
    return root


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory, tiny_sf_repo, tiny_mf_repo, lineart_weights_dir) -> Path:
    """A models folder in the layout ``--models-dir`` expects: both repos, the tiny tagger and the
    line-art files (linked, not copied)."""
    import shutil

    root = tmp_path_factory.mktemp("models")
    shutil.copytree(tiny_sf_repo, root / "paints_undo_single_frame")
    shutil.copytree(tiny_mf_repo, root / "paints_undo_multi_frame")
    tagger_src = TESTS / "fixtures" / "golden" / "tagger"
    for name in ("wd-v1-4-moat-tagger-v2.onnx", "wd-v1-4-moat-tagger-v2.csv"):
        shutil.copy(tagger_src / name, root / name)
    for weights in lineart_weights_dir.iterdir():
        (root / weights.name).symlink_to(weights)
    return root


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Write and summarise the golden-vector resolution report (max error per case output)."""
    import golden

    if not golden.REPORT:
        return
    out_dir = ROOT / "test-artifacts"
    out_dir.mkdir(exist_ok=True)
    lines = ["| case / output | max abs error | tolerance |", "|---|---|---|"]
    lines += [f"| {name} | {err:.3g} | {tol} |" for name, err, tol in sorted(golden.REPORT)]
    (out_dir / "golden_report.md").write_text("\n".join(lines) + "\n")
    terminalreporter.write_sep("-", f"golden report: {len(golden.REPORT)} comparisons -> test-artifacts/golden_report.md")


@pytest.fixture
def tiny_video_unet(tiny_mf_repo):
    """``make(frames)``: the tiny repository's video UNet (float32, eval, no gradients) and inputs of
    one batched-CFG call on ``frames`` 8x8 latent frames (fixed seed)."""
    from diffusers_vdm import UNet3DModel
    from diffusers_vdm.loading import load_module_folder

    def make(frames: int):
        unet = load_module_folder(UNet3DModel, tiny_mf_repo / "unet", torch.float32, None).eval().requires_grad_(False)
        g = torch.Generator().manual_seed(0)
        d, channels = unet.config["context_dim"], unet.config["in_channels"]
        inputs = dict(
            x=torch.randn(2, 4, frames, 8, 8, generator=g), timesteps=torch.tensor([500.0, 20.0]),
            context_text=torch.randn(2, 77, d, generator=g), context_img=torch.randn(2, frames, 16, d, generator=g),
            concat_cond=torch.randn(2, channels - 4, frames, 8, 8, generator=g), fs=torch.full((2,), 24),
        )
        return unet, inputs

    return make


@pytest.fixture
def fake_cuda(monkeypatch):
    """Pretend a CUDA GPU with ``state['free']`` bytes free and fp16/bf16 support."""
    import memory_management

    state = {"free": 40 * GIB, "capability": (9, 0), "bf16": True}
    monkeypatch.setattr(memory_management, "_cuda_available", lambda: True)
    monkeypatch.setattr(memory_management, "_mps_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (state["free"], 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: state["capability"])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: state["bf16"])
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    return state
