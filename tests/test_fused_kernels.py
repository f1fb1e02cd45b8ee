"""The opt-in fused Triton kernels (``diffusers_vdm.fused_kernels``), run on the CPU through Triton's
interpreter: the same math as the PyTorch path they replace, the same layouts, and the switches
that route the video UNet through them. Without a usable Triton the interpreter tests skip (CI
installs Triton from ``requirements-test.txt``); the routing tests run everywhere."""

from __future__ import annotations

import collections
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffusers_vdm import fused_kernels
from diffusers_vdm.normalization import FusableSiLU, GroupNorm, channels_last_group_norm, fuse_norm_silu


def _interpreter_problem() -> str:
    """Why Triton's interpreter cannot run the kernels here ('' when it can). ``conftest.py`` switches
    it on before Triton is first imported, which is when Triton reads the switch."""
    if not fused_kernels.triton_installed():
        return "Triton is not installed"
    if not fused_kernels.interpreter_enabled():
        return "TRITON_INTERPRET is not 1"
    if not fused_kernels.kernels_run_on(torch.device("cpu")):
        return "Triton's interpreter cannot run the kernels here (the warning logged above says why)"
    return ""


@pytest.fixture
def interpreter(monkeypatch):
    problem = _interpreter_problem()
    if problem:
        pytest.skip(problem)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls of each fused kernel wrapper (after the one-time check that the kernels run here,
    which calls each of them once)."""
    if fused_kernels.interpreter_enabled() and fused_kernels.triton_installed():
        fused_kernels.kernels_run_on(torch.device("cpu"))
    calls = collections.Counter()
    for name in ("channel_moments", "scale_shift", "gelu_gate"):
        original = getattr(fused_kernels, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(fused_kernels, name, counted)
    return calls


def _channels_last(*shape, dtype=torch.float32, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * 2.0 + offset
    layout = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    return x.to(dtype).contiguous(memory_format=layout)


# -- where the kernels run ------------------------------------------------------------------------------


def test_kernels_run_only_on_cuda_or_under_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not fused_kernels.usable(torch.zeros(2))
    assert not fused_kernels.usable(torch.zeros(2, device="meta"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fused_kernels.usable(torch.zeros(2)) == fused_kernels.triton_installed()
    assert not fused_kernels.usable(torch.zeros(2), torch.zeros(2, device="meta"))  # mixed devices
    monkeypatch.setattr(fused_kernels, "triton_installed", lambda: False)
    assert not fused_kernels.usable(torch.zeros(2))


def test_kernels_that_do_not_build_leave_the_pytorch_path(interpreter, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(fused_kernels, "scale_shift", broken)
    fused_kernels.kernels_run_on.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            assert not fused_kernels.usable(torch.zeros(2))
            assert not fused_kernels.usable(torch.zeros(2))  # tried once
        assert caplog.text.count("do not run on cpu") == 1 and "PassManager::run failed" in caplog.text
        # A module asked to fuse then runs PyTorch's kernels.
        norm = GroupNorm(32, 64)
        norm.channels_last = norm.fused = True
        x = _channels_last(1, 64, 3, 4)
        with torch.no_grad():
            torch.testing.assert_close(norm(x), F.group_norm(x, 32, norm.weight, norm.bias, norm.eps))
    finally:
        fused_kernels.kernels_run_on.cache_clear()


# -- the kernels ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 96, 10, 20), (2, 128, 3, 9, 11)])
def test_channel_moments_match_float64_sums(interpreter, shape):
    # 96 channels: a partial channel block; 200 and 297 rows: several row splits and a partial one.
    x = _channels_last(*shape, offset=3.0)
    sums, squares = fused_kernels.channel_moments(x)
    dims = tuple(range(2, x.dim()))
    assert sums.shape == squares.shape == shape[:2] and sums.dtype == torch.float32
    torch.testing.assert_close(sums.double(), x.double().sum(dims), rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(squares.double(), x.double().square().sum(dims), rtol=1e-6, atol=1e-4)


def test_channel_moments_accumulate_half_precision_in_float32(interpreter):
    x = _channels_last(2, 64, 16, 16, dtype=torch.float16, offset=1.0)
    sums, squares = fused_kernels.channel_moments(x)
    torch.testing.assert_close(sums, x.float().sum((2, 3)), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(squares, x.float().square().sum((2, 3)), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_scale_shift_is_one_rounding_of_the_float32_math(interpreter, silu, dtype):
    x = _channels_last(2, 96, 5, 7, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    scale, shift = torch.randn(2, 96, generator=g), torch.randn(2, 96, generator=g)
    y = fused_kernels.scale_shift(x, scale, shift, silu=silu)
    expected = x.float() * scale[:, :, None, None] + shift[:, :, None, None]
    expected = (F.silu(expected) if silu else expected).to(dtype)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    # One rounding each way: at most one unit in the last place apart.
    tolerance = 1e-6 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(y, expected, rtol=tolerance, atol=tolerance)
    out = torch.empty_like(x)
    assert fused_kernels.scale_shift(x, scale, shift, silu=silu, out=out) is out and torch.equal(out, y)


def test_kernels_accept_empty_tensors(interpreter):
    empty = torch.empty(2, 64, 0, 3).contiguous(memory_format=torch.channels_last)
    sums, squares = fused_kernels.channel_moments(empty)
    assert sums.shape == squares.shape == (2, 64) and not sums.any() and not squares.any()
    assert fused_kernels.scale_shift(empty, torch.ones(2, 64), torch.zeros(2, 64)).shape == empty.shape


def test_scale_shift_refuses_layouts_it_cannot_write(interpreter):
    x = _channels_last(1, 64, 3, 4)
    scale = shift = torch.ones(1, 64)
    with pytest.raises(ValueError, match="strides"):
        fused_kernels.scale_shift(x, scale, shift, out=torch.empty(1, 64, 3, 4))
    with pytest.raises(ValueError, match="channels-last"):
        fused_kernels.scale_shift(x.contiguous(), scale, shift)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gelu_gate_is_value_times_exact_gelu(interpreter, dtype):
    g = torch.Generator().manual_seed(2)
    value = (torch.randn(3, 5, 700, generator=g) * 3).to(dtype)
    gate = (torch.randn(3, 5, 700, generator=g) * 3).to(dtype)
    out = fused_kernels.gelu_gate(value, gate)
    expected = (value.float() * F.gelu(gate.float())).to(dtype)
    # Values reach about 30; Triton's erf and PyTorch's agree to float32 rounding, not bit for bit.
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    assert out.shape == value.shape and out.dtype == dtype
    torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance)
    assert fused_kernels.gelu_gate(value[:0], gate[:0]).shape == (0, 5, 700)
    with pytest.raises(ValueError, match="shape"):
        fused_kernels.gelu_gate(value, gate[:1])


# -- the modules that use them --------------------------------------------------------------------------


def _norm_and_reference(channels: int, silu: bool) -> tuple[GroupNorm, nn.Module]:
    norm = GroupNorm(32, channels, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    reference = nn.GroupNorm(32, channels, eps=1e-6)
    reference.load_state_dict(norm.state_dict())
    return norm, (nn.Sequential(reference, nn.SiLU()) if silu else reference)


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("shape", [(4, 64, 6, 5), (2, 96, 3, 4, 5)])
def test_fused_group_norm_matches_pytorch(interpreter, kernel_calls, silu, shape):
    norm, reference = _norm_and_reference(shape[1], silu)
    norm.channels_last = norm.fused = True
    norm.applies_silu = silu
    x = _channels_last(*shape, offset=2.0)
    with torch.no_grad():
        y = norm(x)
        expected = reference(x)
    assert kernel_calls == {"channel_moments": 1, "scale_shift": 1}
    assert channels_last_like(y, x)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=2e-5)


def channels_last_like(y: torch.Tensor, x: torch.Tensor) -> bool:
    return y.shape == x.shape and y.stride() == x.stride()


@pytest.mark.parametrize("silu", [False, True])
def test_fused_group_norm_folds_a_per_channel_offset_into_its_statistics(interpreter, kernel_calls, silu):
    # The residual block's norm(h + emb): the sum never materialises, the result is the same.
    norm, reference = _norm_and_reference(96, silu)
    norm.channels_last = norm.fused = True
    norm.applies_silu = silu
    x = _channels_last(3, 96, 6, 5, offset=1.0)
    offset = torch.randn(3, 96, 1, 1, generator=torch.Generator().manual_seed(3)) * 4.0
    with torch.no_grad():
        y = norm(x, offset=offset)
        expected = reference(x + offset)
    assert kernel_calls == {"channel_moments": 1, "scale_shift": 1}
    assert channels_last_like(y, x)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=5e-5)


def test_group_norm_offset_is_added_first_off_the_fused_path():
    norm, reference = _norm_and_reference(64, silu=False)
    x = torch.randn(2, 64, 3, 4)
    offset = torch.randn(2, 64, 1, 1)
    with torch.no_grad():
        assert torch.equal(norm(x, offset=offset), reference(x + offset))  # PyTorch's kernel, as before
        norm.channels_last = True
        x_last = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(
            channels_last_group_norm(x_last, 32, norm.weight, norm.bias, norm.eps, offset=offset),
            reference(x + offset), rtol=1e-5, atol=2e-5)


def test_fused_group_norm_writes_other_layouts_through_pytorch(interpreter, kernel_calls):
    # The temporal transformer asks for its (b, h, w, t, c) token layout: statistics from the kernel,
    # the scale and shift written by PyTorch into those strides.
    norm, reference = _norm_and_reference(64, silu=False)
    norm.channels_last = norm.fused = True
    x = _channels_last(2, 64, 3, 4, 5)
    tokens = torch.empty(2, 4, 5, 3, 64)
    with torch.no_grad():
        norm(x, out=tokens.permute(0, 4, 3, 1, 2))
    assert kernel_calls == {"channel_moments": 1}
    torch.testing.assert_close(tokens.permute(0, 4, 3, 1, 2), reference(x), rtol=1e-5, atol=2e-5)


def test_norm_applies_the_silu_on_every_path():
    norm, reference = _norm_and_reference(64, silu=True)
    layers = nn.Sequential(norm, FusableSiLU())
    x = torch.randn(2, 64, 3, 4)
    with torch.no_grad():
        unfused = layers(x)
        fuse_norm_silu(layers, True)
        assert norm.applies_silu and layers[1].applied_by_norm
        assert torch.equal(layers(x), unfused)  # PyTorch's group norm, then the norm's own SiLU
        torch.testing.assert_close(layers(x), reference(x))
        fuse_norm_silu(layers, False)
    assert not norm.applies_silu and not layers[1].applied_by_norm
    with pytest.raises(TypeError, match="GroupNorm then FusableSiLU"):
        fuse_norm_silu(nn.Sequential(nn.SiLU(), norm), True)


def test_fused_geglu_matches_the_split_products(interpreter, kernel_calls):
    from diffusers_vdm.attention import GEGLU

    geglu = GEGLU(32, 48).requires_grad_(False)
    x = torch.randn(3, 7, 32)
    plain = geglu(x)
    geglu.fused = True
    fused = geglu(x)
    assert kernel_calls == {"gelu_gate": 1}
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    # Gradients wanted: the PyTorch path, differentiable.
    geglu.requires_grad_(True)
    assert geglu(x).requires_grad and kernel_calls == {"gelu_gate": 1}


def test_video_unet_with_fused_kernels_matches_the_reference(interpreter, kernel_calls, tiny_video_unet):
    from diffusers_vdm.attention import GEGLU

    unet, inputs = tiny_video_unet(frames=4)
    with torch.no_grad():
        reference = unet(**inputs)
        unet.set_channels_last(True)
        unet.set_fused_kernels(True)
        fused = unet(**inputs)
        assert unet.fused_kernels
        # Every group norm but the temporal transformers' (another output layout) runs both kernels,
        # and every feed-forward gate its one.
        norms = [m for m in unet.modules() if isinstance(m, GroupNorm)]
        gates = [m for m in unet.modules() if isinstance(m, GEGLU)]
        assert kernel_calls["channel_moments"] == len(norms)
        assert 0 < kernel_calls["scale_shift"] < len(norms)
        assert kernel_calls["gelu_gate"] == len(gates)
        torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-4)
        unet.set_fused_kernels(False)
        assert not any(m.fused or m.applies_silu for m in norms) and not any(m.fused for m in gates)
        calls_before = sum(kernel_calls.values())
        unfused = unet(**inputs)
        assert sum(kernel_calls.values()) == calls_before
        torch.testing.assert_close(unfused, reference, rtol=1e-4, atol=1e-4)


def test_video_unet_fused_switch_changes_nothing_where_triton_cannot_run(kernel_calls, tiny_video_unet, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    unet, inputs = tiny_video_unet(frames=2)
    with torch.no_grad():
        reference = unet(**inputs)
        unet.set_fused_kernels(True)
        # The norms now apply their SiLU themselves: the same operations in the same order.
        assert torch.equal(unet(**inputs), reference)
    assert not kernel_calls


def test_model_manager_applies_the_fused_switch(tiny_mf_repo, fake_cuda, monkeypatch, caplog):
    from diffusers_vdm import LatentVideoDiffusionPipeline
    from paints_undo.models import ModelManager

    pipe = LatentVideoDiffusionPipeline.from_pretrained(tiny_mf_repo)
    assert not pipe.unet.fused_kernels
    assert not ModelManager(device="cuda", vram_mode="high").use_fused_kernels  # opt-in
    monkeypatch.setattr(fused_kernels, "triton_installed", lambda: True)
    ModelManager(device="cuda", vram_mode="high", fused_kernels=True).apply_memory_settings(pipe)
    assert pipe.unet.fused_kernels
    ModelManager(device="cuda", vram_mode="high").apply_memory_settings(pipe)
    assert not pipe.unet.fused_kernels
    # Where they cannot run, the flag is ignored with the reason, and nothing else changes.
    fake_cuda["capability"] = (7, 5)
    cases = [(dict(device="cuda"), "compute capability 8.0 or newer"), (dict(device="cpu"), "CUDA GPUs only")]
    for kwargs, reason in cases:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            ModelManager(vram_mode="high", fused_kernels=True, **kwargs).apply_memory_settings(pipe)
        assert not pipe.unet.fused_kernels and reason in caplog.text
    fake_cuda["capability"] = (8, 6)
    monkeypatch.setattr(fused_kernels, "triton_installed", lambda: False)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        ModelManager(device="cuda", vram_mode="high", fused_kernels=True).apply_memory_settings(pipe)
    assert not pipe.unet.fused_kernels and "need Triton" in caplog.text


def test_cli_and_app_accept_the_fused_kernels_flag():
    import gradio_app
    from paints_undo import cli

    args = cli.build_parser().parse_args(["--fused-kernels", "x.png"])
    assert args.fused_kernels is True and cli.model_manager_from_args(args).fused_kernels
    assert not cli.model_manager_from_args(cli.build_parser().parse_args(["x.png"])).fused_kernels
    assert gradio_app.parse_args(["--fused-kernels"]).fused_kernels is True
    assert gradio_app.parse_args([]).fused_kernels is False


def test_kernels_build_for_an_h100_without_one():
    """Triton compiles the kernels for sm_90 here, as it does at their first launch on an H100: the
    interpreter tests check their arithmetic, this checks that the GPU build exists and spills nothing."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    if not fused_kernels.triton_installed():
        pytest.skip("Triton is not installed")
    script = Path(__file__).resolve().parent / "triton_sm90_build.py"
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    builds = [json.loads(line) for line in result.stdout.splitlines()]
    assert {(b["kernel"], b["dtype"]) for b in builds} == {
        (kernel, dtype) for kernel in ("channel_moments", "scale_shift", "gelu_gate")
        for dtype in ("*fp16", "*bf16", "*fp32")
    }
    assert all(b["cubin_bytes"] > 0 for b in builds)
    assert all(b.get("local", 0) == 0 for b in builds)  # no register spills to local memory
