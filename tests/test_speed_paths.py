"""The speed paths of issue 7 that CPU can check: clip-wide group norm, the channels-last layout,
cached embedding frequencies, the CUDA-graph runner's fallbacks and signatures, and how they are
switched on."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffusers_vdm.cuda_graphs import CUDAGraphRunner, _signature
from diffusers_vdm.embeddings import timestep_embedding
from diffusers_vdm.normalization import (
    ClipGroupNorm, GroupNorm, channels_last_format, channels_last_group_norm, wide_group_norm,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("affine", [True, False])
def test_wide_group_norm_matches_group_norm(dtype, affine):
    g = torch.Generator().manual_seed(0)
    # Offset and scale so that a variance computed carelessly would lose digits.
    x = torch.randn(2, 64, 5, 6, 7, generator=g, dtype=dtype) * 3.0 + 2.0
    frames_major = x.transpose(1, 2).contiguous().transpose(1, 2)  # the UNet's non-contiguous view
    weight = torch.randn(64, generator=g, dtype=dtype) if affine else None
    bias = torch.randn(64, generator=g, dtype=dtype) if affine else None
    expected = F.group_norm(x, 32, weight, bias, 1e-6)
    got = wide_group_norm(frames_major, 32, weight, bias, 1e-6)
    assert got.dtype == dtype and got.shape == x.shape
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    assert (got - expected).abs().max().item() < tolerance


def test_wide_group_norm_keeps_half_precision_output():
    x = torch.randn(1, 32, 2, 3, 4).to(torch.bfloat16)
    out = wide_group_norm(x, 8, torch.ones(32, dtype=torch.bfloat16), torch.zeros(32, dtype=torch.bfloat16), 1e-5)
    assert out.dtype == torch.bfloat16
    expected = F.group_norm(x.float(), 8, None, None, 1e-5)
    assert (out.float() - expected).abs().max().item() < 0.05


def test_clip_group_norm_is_a_group_norm_and_exact_on_cpu():
    norm = ClipGroupNorm(32, 64, eps=1e-6)
    reference = nn.GroupNorm(32, 64, eps=1e-6)
    assert list(norm.state_dict()) == list(reference.state_dict()) == ["weight", "bias"]
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    reference.load_state_dict(norm.state_dict())
    x = torch.randn(2, 64, 4, 3, 5)
    # On the CPU the fast path is not taken: bit-identical to PyTorch's group norm.
    assert torch.equal(norm(x), reference(x))


# -- channels-last layout ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 64, 5, 6, 7), (3, 64, 9, 10)])
@pytest.mark.parametrize("affine", [True, False])
def test_channels_last_group_norm_matches_group_norm(shape, affine):
    g = torch.Generator().manual_seed(0)
    layout = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    x = torch.randn(*shape, generator=g) * 3.0 + 5.0  # an offset that a careless variance would feel
    weight = torch.randn(64, generator=g) if affine else None
    bias = torch.randn(64, generator=g) if affine else None
    expected = F.group_norm(x, 32, weight, bias, 1e-6)
    got = channels_last_group_norm(x.contiguous(memory_format=layout), 32, weight, bias, 1e-6)
    assert got.is_contiguous(memory_format=layout) and not got.is_contiguous()
    assert (got - expected).abs().max().item() < 2e-5


def test_channels_last_group_norm_in_half_precision_and_into_any_layout():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 64, 4, 5, 6, generator=g) * 2.0 + 3.0).half().contiguous(memory_format=torch.channels_last_3d)
    weight, bias = torch.randn(64, generator=g).half(), torch.randn(64, generator=g).half()
    expected = F.group_norm(x.float(), 32, weight.float(), bias.float(), 1e-6)
    got = channels_last_group_norm(x, 32, weight, bias, 1e-6)
    assert got.dtype == torch.float16
    # Statistics in float32, so the only error is the float16 rounding of the result.
    assert ((got.float() - expected).abs() <= expected.abs() * 2**-10 + 1e-3).all()
    # Written straight into a transformer's (b, h, w, t, c) token layout.
    tokens = torch.empty(2, 5, 6, 4, 64, dtype=torch.float16)
    into = channels_last_group_norm(x, 32, weight, bias, 1e-6, out=tokens.permute(0, 4, 3, 1, 2))
    assert into.data_ptr() == tokens.data_ptr() and torch.equal(into, got)


def test_channels_last_format_tells_layouts_apart():
    assert channels_last_format(torch.empty(2, 8, 3, 4)) is None
    assert channels_last_format(torch.empty(2, 8, 3, 4).contiguous(memory_format=torch.channels_last)) is torch.channels_last
    clip = torch.empty(2, 3, 4, 5, 8).permute(0, 4, 1, 2, 3)  # (b, t, h, w, c) memory
    assert channels_last_format(clip) is torch.channels_last_3d
    # One channel: contiguous and channels-last at once, so not a channels-last tensor to keep.
    assert channels_last_format(torch.empty(2, 1, 3, 4)) is None


def test_group_norm_keeps_the_layout_only_when_switched_on():
    norm = GroupNorm(32, 64)
    x = torch.randn(2, 64, 3, 4, device="meta").contiguous(memory_format=torch.channels_last)
    assert norm.to("meta")(x).is_contiguous()  # PyTorch's kernel, as before: channels-first
    norm.channels_last = True
    with torch.no_grad():
        y = norm(x)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    out = torch.empty(2, 3, 4, 64, device="meta").permute(0, 3, 1, 2)
    with torch.no_grad():
        assert norm(x, out=out) is out
    # Channels-first input takes PyTorch's kernel whatever the switch says.
    assert norm(torch.randn(2, 64, 3, 4, device="meta")).is_contiguous()
    # With gradients wanted (the parameters require them here) the result is the same and differentiable.
    assert norm.weight.requires_grad and torch.is_grad_enabled()
    assert norm(x).requires_grad and norm(x).is_contiguous(memory_format=torch.channels_last)


def test_unet_channels_last_switch_keeps_weights_and_restores_them(tiny_mf_repo):
    from diffusers_vdm import UNet3DModel
    from diffusers_vdm.attention import TemporalTransformer
    from diffusers_vdm.loading import load_module_folder

    unet = load_module_folder(UNet3DModel, tiny_mf_repo / "unet", torch.float32, None)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    unet.set_channels_last(True)
    convs = [m for m in unet.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
    layout = {nn.Conv2d: torch.channels_last, nn.Conv3d: torch.channels_last_3d}
    assert convs and all(m.weight.is_contiguous(memory_format=layout[type(m)]) for m in convs)
    assert sum(not m.weight.is_contiguous() for m in convs) > len(convs) // 2  # (1x1 kernels are both)
    assert all(m.channels_last for m in unet.modules() if isinstance(m, (GroupNorm, TemporalTransformer)))
    state = unet.state_dict()
    assert list(state) == list(before) and all(torch.equal(state[k], before[k]) for k in before)
    unet.set_channels_last(False)
    assert all(m.weight.is_contiguous() for m in convs)
    assert not any(m.channels_last for m in unet.modules() if isinstance(m, (GroupNorm, TemporalTransformer)))


def test_unet_switches_every_clip_norm(tiny_mf_repo):
    from diffusers_vdm import UNet3DModel
    from diffusers_vdm.loading import load_module_folder

    unet = load_module_folder(UNet3DModel, tiny_mf_repo / "unet", torch.float32, None)
    norms = [m for m in unet.modules() if isinstance(m, ClipGroupNorm)]
    # Four per temporal conv block and one per temporal transformer.
    assert norms and all(m.fast for m in norms)
    unet.set_fast_clip_norm(False)
    assert not any(m.fast for m in norms)
    # The per-frame group norms have no clip-wide path (PyTorch's kernel is already parallel enough).
    per_frame = [m for name, m in unet.named_modules()
                 if isinstance(m, nn.GroupNorm) and ("in_layers" in name or "out_layers" in name)]
    assert per_frame and all(type(m) is GroupNorm for m in per_frame)


def test_split_geglu_is_the_same_math(tiny_mf_repo):
    from diffusers_vdm import UNet3DModel
    from diffusers_vdm.attention import GEGLU
    from diffusers_vdm.loading import load_module_folder

    geglu = GEGLU(32, 48)
    x = torch.randn(3, 7, 32)
    joint = geglu(x)  # CPU: the original's single product
    assert torch.allclose(geglu.split_forward(x), joint, atol=1e-6, rtol=1e-5)
    assert geglu.split_forward(x).is_contiguous()

    unet = load_module_folder(UNet3DModel, tiny_mf_repo / "unet", torch.float32, None)
    gates = [m for m in unet.modules() if isinstance(m, GEGLU)]
    assert gates and all(m.split for m in gates)
    unet.set_split_geglu(False)
    assert not any(m.split for m in gates)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
def test_temporal_conv_as_2d_is_the_same_convolution(layout):
    from diffusers_vdm.unet import temporal_conv_as_2d

    g = torch.Generator().manual_seed(0)
    conv = nn.Conv3d(16, 24, (3, 1, 1), padding=(1, 0, 0))
    x = torch.randn(2, 16, 5, 3, 4, generator=g).contiguous(memory_format=layout)
    conv.weight.data = conv.weight.data.contiguous(memory_format=layout)
    with torch.no_grad():
        y = temporal_conv_as_2d(conv, x)
        expected = conv(x)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    assert y.shape == expected.shape
    if layout == torch.channels_last_3d:
        # No copy on the way in (a view of the clip) and the layout kept on the way out.
        assert x.flatten(3).data_ptr() == x.data_ptr() and x.flatten(3).is_contiguous(memory_format=torch.channels_last)
        assert y.is_contiguous(memory_format=torch.channels_last_3d)


def test_temporal_conv_as_2d_leaves_other_kernels_to_conv3d():
    from diffusers_vdm.unet import temporal_conv_as_2d

    x = torch.randn(1, 8, 4, 5, 6)
    for conv in (nn.Conv3d(8, 8, (3, 3, 1), padding=(1, 1, 0)), nn.Conv3d(8, 8, (3, 1, 1), stride=(2, 1, 1)),
                 nn.Conv3d(8, 8, (3, 1, 1), padding=(1, 0, 0), padding_mode="replicate")):
        with torch.no_grad():
            assert torch.equal(temporal_conv_as_2d(conv, x), conv(x))


def test_unet_temporal_conv_2d_switch(tiny_video_unet):
    from diffusers_vdm.unet import TemporalConvBlock

    unet, inputs = tiny_video_unet(frames=3)
    blocks = [m for m in unet.modules() if isinstance(m, TemporalConvBlock)]
    with torch.no_grad():
        reference = unet(**inputs)
        unet.set_temporal_conv_2d(True)
        assert blocks and all(m.as_2d for m in blocks) and unet.temporal_conv_2d
        torch.testing.assert_close(unet(**inputs), reference, rtol=1e-5, atol=1e-5)
        unet.set_temporal_conv_2d(False)
    assert not any(m.as_2d for m in blocks)


def test_timestep_embedding_frequencies_are_cached_and_exact():
    t = torch.tensor([0.0, 1.0, 999.0])
    first = timestep_embedding(t, 320)
    second = timestep_embedding(t, 320)
    half = 160
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None] * freqs[None]
    assert torch.equal(first, torch.cat([torch.cos(args), torch.sin(args)], dim=-1))
    assert torch.equal(first, second)
    from diffusers_vdm.embeddings import _frequencies

    assert _frequencies(half, 10000, t.device) is _frequencies(half, 10000, t.device)


class _Doubler(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x, t, context=None):
        out = x * self.scale + t[:, None]
        return out if context is None else out + context.sum()


def test_cuda_graph_runner_falls_back_to_the_module_on_cpu():
    module = _Doubler()
    runner = CUDAGraphRunner(module)
    x, t = torch.randn(2, 3), torch.tensor([1.0, 2.0])
    with torch.inference_mode():
        out = runner(x, t, context=torch.ones(2))
    assert torch.equal(out, module(x, t, context=torch.ones(2)))
    assert runner.disabled_reason == "inputs are not on a CUDA device"
    # Parameters are the module's own (device and dtype queries keep working through the runner).
    assert list(runner.parameters()) == list(module.parameters())


def test_cuda_graph_signature_tracks_shapes_layouts_and_plain_values():
    a = {"x": torch.zeros(2, 3), "fs": 3, "ctx": (torch.zeros(1, 4), torch.zeros(1, 2))}
    same = {"x": torch.ones(2, 3), "fs": 3, "ctx": (torch.ones(1, 4), torch.ones(1, 2))}
    assert _signature(a) == _signature(same)
    for changed in ({**a, "x": torch.zeros(3, 3)}, {**a, "x": torch.zeros(2, 3, dtype=torch.float64)},
                    {**a, "x": torch.zeros(3, 2).t()}, {**a, "fs": 4},
                    {**a, "ctx": (torch.zeros(1, 4), torch.zeros(1, 3))}):
        assert _signature(changed) != _signature(a)


def test_cuda_graph_runner_notices_moved_weights():
    module = _Doubler()
    runner = CUDAGraphRunner(module)
    before = runner._weights_signature()
    module.to(torch.float64)
    assert runner._weights_signature() != before


def test_model_manager_and_pipeline_switch(tiny_mf_repo, fake_cuda):
    from diffusers_vdm import LatentVideoDiffusionPipeline
    from paints_undo.models import ModelManager

    pipe = LatentVideoDiffusionPipeline.from_pretrained(tiny_mf_repo)
    # Opt-in: exact, but measured no faster on an H100.
    assert not ModelManager(device="cuda", vram_mode="high").use_cuda_graphs
    assert ModelManager(device="cuda", vram_mode="high", cuda_graphs=True).use_cuda_graphs
    assert not ModelManager(device="cpu", vram_mode="high", cuda_graphs=True).use_cuda_graphs

    ModelManager(device="cuda", vram_mode="high").apply_memory_settings(pipe)
    assert not pipe.cuda_graphs
    ModelManager(device="cuda", vram_mode="high", cuda_graphs=True).apply_memory_settings(pipe)
    assert pipe.cuda_graphs
    # The UNet lives on the CPU here, so sampling calls it directly.
    assert pipe.sampling_unet() is pipe.unet
    pipe.set_cuda_graphs(False)
    assert not pipe.cuda_graphs and pipe._graph_runner is None


def test_model_manager_applies_the_channels_last_switch(tiny_mf_repo):
    from diffusers_vdm import LatentVideoDiffusionPipeline
    from paints_undo.models import ModelManager

    pipe = LatentVideoDiffusionPipeline.from_pretrained(tiny_mf_repo)
    assert not pipe.unet.channels_last
    ModelManager(device="cpu", vram_mode="high", channels_last=True).apply_memory_settings(pipe)
    assert pipe.unet.channels_last
    ModelManager(device="cpu", vram_mode="high").apply_memory_settings(pipe)  # opt-in: off by default
    assert not pipe.unet.channels_last


def test_cli_and_app_accept_the_speed_flags():
    import gradio_app
    from paints_undo import cli

    parser = cli.build_parser()
    assert parser.parse_args(["--cuda-graphs", "x.png"]).cuda_graphs is True
    assert parser.parse_args(["x.png"]).cuda_graphs is False
    assert gradio_app.parse_args(["--cuda-graphs"]).cuda_graphs is True
    assert gradio_app.parse_args([]).cuda_graphs is False
    # Layout and segment batching: unset means the memory manager's choice for the device.
    assert parser.parse_args(["--channels-last", "x.png"]).channels_last is True
    assert parser.parse_args(["--no-channels-last", "x.png"]).channels_last is False
    assert parser.parse_args(["x.png"]).channels_last is None
    assert gradio_app.parse_args(["--channels-last"]).channels_last is True
    assert gradio_app.parse_args(["--no-channels-last"]).channels_last is False
    assert gradio_app.parse_args([]).channels_last is None
    assert parser.parse_args(["--segment-batch", "7", "x.png"]).segment_batch == 7
    assert parser.parse_args(["x.png"]).segment_batch is None
    assert gradio_app.parse_args(["--segment-batch", "3"]).segment_batch == 3
    assert gradio_app.parse_args([]).segment_batch is None
    for bad in ("0", "-2", "two"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--segment-batch", bad, "x.png"])


# -- low-VRAM video decoding: temporal mixing band by band -------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_group_moments_merged_over_bands_equal_the_whole(dtype):
    from diffusers_vdm.normalization import group_moments, merge_group_moments, normalize_with_moments

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 4, 7, 5, generator=g, dtype=dtype) * 5.0 + 40.0  # offset: a careless variance loses digits
    clip = x.transpose(1, 2).contiguous().transpose(1, 2)  # the decoder's non-contiguous (b, c, t, h, w) view
    merged = None
    for start, stop in ((0, 3), (3, 4), (4, 7)):  # uneven bands of rows
        merged = merge_group_moments(merged, group_moments(clip[..., start:stop, :], 4))
    mean, m2, count = merged
    var, expected_mean = torch.var_mean(x.double().reshape(2, 4, -1), dim=-1, correction=0)
    assert count == x[0, :2].numel()
    assert torch.allclose(mean.double(), expected_mean, rtol=0, atol=1e-5)
    assert torch.allclose((m2 / count).double(), var, rtol=1e-5, atol=0)

    weight, bias = torch.randn(8, generator=g, dtype=dtype), torch.randn(8, generator=g, dtype=dtype)
    expected = F.group_norm(x, 4, weight, bias, 1e-6)
    band = normalize_with_moments(clip[..., 3:6, :], merged, weight, bias, 1e-6)
    assert band.dtype == dtype
    assert (band - expected[..., 3:6, :]).abs().max().item() < 1e-4
    assert torch.equal(clip, x)  # the input is left alone


def test_row_bands_cover_every_row_within_the_budget():
    from diffusers_vdm.vae import row_bands

    assert row_bands(10, row_bytes=100, budget_bytes=300) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert row_bands(4, row_bytes=100, budget_bytes=1) == [(0, 1), (1, 2), (2, 3), (3, 4)]  # at least a row
    assert row_bands(4, row_bytes=100, budget_bytes=10_000) == [(0, 4)]


def _video_res_block(kernel=(3, 1, 1)):
    from diffusers_vdm.vae import VideoResBlock

    torch.manual_seed(0)
    block = VideoResBlock(in_channels=32, out_channels=32, temb_channels=0, dropout=0.0, video_kernel_size=list(kernel))
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.2)
    return block.eval()


def test_video_block_in_bands_matches_whole_clips():
    block = _video_res_block()
    assert block.time_stack.mixes_only_time()
    x = torch.randn(2 * 5, 32, 9, 6) * 3.0 + 1.0
    with torch.inference_mode():
        whole = block(x.clone(), timesteps=5)
        clip_bytes = x[:5].numel() * x.element_size()
        row_bytes = clip_bytes // 9
        banded = block(x.clone(), timesteps=5, band_bytes=2 * row_bytes)  # 5 bands of <= 2 rows
        also_chunked = block(x.clone(), timesteps=5, frame_chunk=3, band_bytes=row_bytes)
    assert (banded - whole).abs().max().item() < 1e-4
    assert (also_chunked - whole).abs().max().item() < 1e-4
    assert whole.abs().max().item() > 1.0  # not trivially zero


def test_video_block_with_spatial_kernels_ignores_bands():
    """A temporal kernel that also spans pixels cannot be split into bands of rows: whole clips."""
    block = _video_res_block(kernel=(3, 3, 3))
    assert not block.time_stack.mixes_only_time()
    x = torch.randn(4, 32, 6, 5)
    with torch.inference_mode():
        assert torch.equal(block(x.clone(), timesteps=4, band_bytes=64), block(x.clone(), timesteps=4))


def test_vram_modes_set_the_decoder_memory_switches(tiny_mf_repo, fake_cuda):
    from diffusers_vdm import LatentVideoDiffusionPipeline
    from paints_undo.models import ModelManager

    pipe = LatentVideoDiffusionPipeline.from_pretrained(tiny_mf_repo)
    expected = {"high": (0, 0), "normal": (4, 64 * 2**20), "low": (2, 32 * 2**20)}
    for mode, (chunk, band) in expected.items():
        ModelManager(device="cuda", vram_mode=mode).apply_memory_settings(pipe)
        assert (pipe.vae.decoder.frame_chunk, pipe.vae.decoder.band_bytes) == (chunk, band), mode
