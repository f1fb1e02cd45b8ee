"""Multi-frame model: golden vectors of the original, strict loading and full-size key layouts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from golden import (
    TINY_REPOS,
    assert_close,
    load_case,
    max_abs_err,
    record,
    reference_config,
    reference_keys,
)

from diffusers_vdm import (
    ImprovedCLIPVisionModelWithProjection,
    LatentVideoDiffusionPipeline,
    Resampler,
    SamplerDynamicTSNR,
    UNet3DModel,
    VideoAutoencoderKL,
)
from diffusers_vdm.vae import TimeStackBlock
from diffusers_vdm.dynamic_tsnr_sampler import (
    batch_randn, ddim_direction_scale, ddim_sigmas, uniform_trailing_timesteps,
)
from diffusers_vdm.loading import IncompatibleCheckpointError, ModelFilesNotFoundError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pipe(tiny_mf_repo) -> LatentVideoDiffusionPipeline:
    return LatentVideoDiffusionPipeline.from_pretrained(tiny_mf_repo)


# -- loading -----------------------------------------------------------------------------------


@pytest.mark.parametrize("component", ["unet", "vae", "image_projection", "text_encoder", "image_encoder"])
def test_every_manifest_key_is_loaded_with_its_derived_value(pipe, tiny_mf_repo, component):
    on_disk = load_file(str(tiny_mf_repo / component / "model.safetensors"))
    state = getattr(pipe, component).state_dict()
    if component == "text_encoder" and not any(k.startswith("text_model.") for k in state):
        state = {f"text_model.{k}": v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    assert set(state) == set(on_disk)
    for key, value in on_disk.items():
        assert torch.equal(state[key], value), key


def test_configs_are_read_from_each_folder_not_hard_coded(pipe, tiny_mf_repo):
    unet_config = json.loads((tiny_mf_repo / "unet" / "config.json").read_text())
    assert pipe.unet.config == unet_config
    assert pipe.vae.config == json.loads((tiny_mf_repo / "vae" / "config.json").read_text())
    assert pipe.image_projection.config == json.loads((tiny_mf_repo / "image_projection" / "config.json").read_text())


def test_from_pretrained_casts_dtype_per_component(tiny_mf_repo):
    p = LatentVideoDiffusionPipeline.from_pretrained(tiny_mf_repo, dtype={"unet": torch.float16, "vae": torch.bfloat16})
    assert p.unet.dtype == torch.float16
    assert p.vae.dtype == torch.bfloat16
    assert p.image_projection.dtype == torch.float32
    assert not p.unet.training and not p.image_projection.training


def test_missing_folder_and_offline_hub_give_clear_errors(tmp_path):
    with pytest.raises(ModelFilesNotFoundError, match="does not exist"):
        LatentVideoDiffusionPipeline.from_pretrained(tmp_path / "nope")
    with pytest.raises(ModelFilesNotFoundError, match="huggingface-cli download"):
        LatentVideoDiffusionPipeline.from_pretrained("someone/not-cached-repo")


def test_checkpoint_with_missing_key_is_rejected(tiny_mf_repo, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_mf_repo, broken)
    sd = load_file(str(broken / "unet" / "model.safetensors"))
    sd.pop("out.2.bias")
    sd["extra.weight"] = torch.zeros(1)
    save_file(sd, str(broken / "unet" / "model.safetensors"))
    with pytest.raises(IncompatibleCheckpointError, match="out.2.bias"):
        LatentVideoDiffusionPipeline.from_pretrained(broken)


# -- full-size layouts ---------------------------------------------------------------------------


def _layout(module: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize(
    "component, build",
    [
        ("mf_unet", lambda kw: UNet3DModel(**kw)),
        ("mf_vae", lambda kw: VideoAutoencoderKL(**kw)),
        ("mf_image_projection", lambda kw: Resampler(**kw)),
    ],
)
def test_full_size_layout_matches_official_checkpoint(component, build):
    with torch.device("meta"):
        model = build(reference_config(component))
    expected = reference_keys(component)
    got = _layout(model)
    assert list(got) == list(expected)  # names and their order
    assert got == expected  # and shapes


def test_full_size_image_encoder_layout():
    from transformers import CLIPVisionConfig

    with torch.device("meta"):
        model = ImprovedCLIPVisionModelWithProjection(CLIPVisionConfig(**reference_config("mf_image_encoder")))
    got = {k: v for k, v in _layout(model).items() if not k.endswith("position_ids")}
    assert got == reference_keys("mf_image_encoder")


def test_full_size_text_encoder_layout():
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig(**reference_config("mf_text_encoder")))
    got = {(k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in _layout(model).items()
           if not k.endswith("position_ids")}
    assert got == reference_keys("mf_text_encoder")


# -- golden cases ----------------------------------------------------------------------------------


def test_mf_unet_golden(pipe):
    case, t = load_case("mf_unet")
    tol = case["tolerance"]
    kwargs = dict(context_text=t["context_text"], context_img=t["context_img"], concat_cond=t["concat_cond"], fs=t["fs"])
    unet = pipe.unet
    try:
        with torch.inference_mode():
            assert_close(unet(t["x"], t["timesteps"], **kwargs), t["out"], tol, "mf_unet/out")
            for mode in ("prv", "first", "roll"):
                unet.set_temporal_window(True, mode)
                assert len(unet.spatial_self_attentions()) == case["notes"]["windowed_modules"]
                assert_close(unet(t["x"], t["timesteps"], **kwargs), t[f"out_window_{mode}"], tol, f"mf_unet/out_window_{mode}")
    finally:
        unet.set_temporal_window(False)
    # The window is a run-time switch and off by default: output back to the plain forward.
    with torch.inference_mode():
        assert_close(unet(t["x"], t["timesteps"], **kwargs), t["out"], tol)


@pytest.mark.parametrize("norm_path", ["pytorch", "channels-last kernels"])
def test_mf_unet_channels_last_matches_the_original(pipe, monkeypatch, norm_path):
    """The channels-last layout (the default on CUDA GPUs) is the same math: the golden output, with
    both group-norm paths (PyTorch's, which keeps the layout on the CPU, and ours, which the GPU takes)."""
    from diffusers_vdm import normalization

    if norm_path != "pytorch":
        monkeypatch.setattr(normalization, "native_group_norm_keeps_channels_last", lambda device: False)
    case, t = load_case("mf_unet")
    kwargs = dict(context_text=t["context_text"], context_img=t["context_img"], concat_cond=t["concat_cond"], fs=t["fs"])
    unet = pipe.unet
    try:
        unet.set_channels_last(True)
        with torch.inference_mode():
            out = unet(t["x"], t["timesteps"], **kwargs)
    finally:
        unet.set_channels_last(False)
    assert_close(out, t["out"], case["tolerance"], f"mf_unet/out_channels_last ({norm_path})")
    with torch.inference_mode():
        assert (out - unet(t["x"], t["timesteps"], **kwargs)).abs().max().item() < 1e-5


def test_mf_unet_per_frame_text_context_matches_shared(pipe):
    """Text given per frame (the original's repeat) and per clip (ours) are the same math."""
    _, t = load_case("mf_unet")
    b, _, frames = t["x"].shape[:3]
    kwargs = dict(context_img=t["context_img"], concat_cond=t["concat_cond"], fs=t["fs"])
    with torch.inference_mode():
        shared = pipe.unet(t["x"], t["timesteps"], context_text=t["context_text"], **kwargs)
        attn = pipe.unet.input_blocks[1][1].transformer_blocks[0].attn2
        q = torch.randn(b * frames, 96, attn.to_q.in_features)
        per_frame = attn._attend_shared_context(q, t["context_text"].repeat_interleave(frames, 0), frames)
        folded = attn._attend_shared_context(q, t["context_text"], frames)
    assert torch.allclose(per_frame, folded, atol=1e-5)
    assert torch.isfinite(shared).all()


def test_mf_vae_golden(pipe):
    case, t = load_case("mf_vae")
    tol = case["tolerance"]
    videos = t["videos_uint8"].float() / 127.5 - 1.0
    latents, hidden = pipe.encode_latents(videos, return_hidden_states=True)
    assert_close(latents, t["latents"], tol, "mf_vae/latents")
    assert len(hidden) == 5
    for i, h in enumerate(hidden):
        assert_close(h, t[f"hidden_state_{i}"], tol, f"mf_vae/hidden_state_{i}")
    decoded = pipe.decode_latents(t["latents"], [t[f"hidden_state_{i}"] for i in range(5)])
    assert_close(decoded, t["decoded"], tol, "mf_vae/decoded")
    b, c, frames, h, w = videos.shape
    with torch.inference_mode():
        posterior, none = pipe.vae.encode(videos.transpose(1, 2).reshape(b * frames, c, h, w))
    assert none is None
    assert_close(posterior.mean, t["posterior_mean"], tol, "mf_vae/posterior_mean")
    assert_close(posterior.logvar, t["posterior_logvar"], tol, "mf_vae/posterior_logvar")


def test_mf_vae_decoder_frame_chunking_is_exact(pipe):
    case, t = load_case("mf_vae")
    hidden = [t[f"hidden_state_{i}"] for i in range(5)]
    try:
        pipe.vae.set_decoder_frame_chunk(3)
        chunked = pipe.decode_latents(t["latents"], hidden)
    finally:
        pipe.vae.set_decoder_frame_chunk(0)
    assert_close(chunked, t["decoded"], case["tolerance"], "mf_vae/decoded_chunked3")


@pytest.mark.parametrize("band_bytes", [1, 3000])
def test_mf_vae_decoder_temporal_bands_match_the_original(pipe, band_bytes):
    """Low-VRAM decoding: temporal mixing band by band (clip-wide norm statistics merged across
    bands), together with frame chunks; 1 byte forces one row per band."""
    case, t = load_case("mf_vae")
    hidden = [t[f"hidden_state_{i}"] for i in range(5)]
    blocks = [m for m in pipe.vae.decoder.modules() if isinstance(m, TimeStackBlock)]
    assert blocks and all(block.mixes_only_time() for block in blocks)
    try:
        pipe.vae.set_decoder_frame_chunk(2)
        pipe.vae.set_decoder_band_bytes(band_bytes)
        banded = pipe.decode_latents(t["latents"], hidden)
    finally:
        pipe.vae.set_decoder_frame_chunk(0)
        pipe.vae.set_decoder_band_bytes(0)
    assert_close(banded, t["decoded"], case["tolerance"], f"mf_vae/decoded_bands{band_bytes}")
    whole = pipe.decode_latents(t["latents"], hidden)
    assert (banded - whole).abs().max().item() < 1e-5


def test_mf_image_encoder_golden(pipe):
    case, t = load_case("mf_image_encoder")
    frames = t["frames_uint8"].float() / 127.5 - 1.0
    out = pipe.encode_clip_vision(frames)
    assert out.shape[2] == case["notes"]["tokens"]
    assert_close(out, t["last_hidden_state"], case["tolerance"], "mf_image_encoder/last_hidden_state")


def test_mf_resampler_golden(pipe):
    case, t = load_case("mf_resampler")
    with torch.inference_mode():
        out = pipe.image_projection(t["x"])
    assert_close(out, t["out"], case["tolerance"], "mf_resampler/out")


def _sampler_extra_args(t, batch: int) -> dict:
    fs = torch.tensor([3] * batch, dtype=torch.long)
    return dict(
        cfg_scale=7.5,
        positive=dict(context_text=t["positive_text_cond"], context_img=t["positive_image_cond"], fs=fs,
                      concat_cond=t["concat_cond"]),
        negative=dict(context_text=t["negative_text_cond"], context_img=t["negative_image_cond"], fs=fs,
                      concat_cond=t["concat_cond"]),
    )


def test_mf_sampler_golden(pipe):
    case, t = load_case("mf_sampler")
    tol = case["tolerance"]
    sampler = SamplerDynamicTSNR(pipe.unet)
    assert torch.equal(sampler.get_uniform_trailing_steps(case["config"]["steps"]), t["timesteps"])

    outputs, times = [], []
    original_apply = sampler.model_apply

    def spy(x, t_in, **kw):
        times.append(t_in.clone())
        out = original_apply(x, t_in, **kw)
        outputs.append(out.clone())
        return out

    sampler.model_apply = spy
    torch.manual_seed(case["seed"])
    latents = sampler(t["concat_cond"].shape, case["config"]["steps"], extra_args=_sampler_extra_args(t, 2))
    assert_close(latents, t["latents"], tol, "mf_sampler/latents")
    for i in range(case["config"]["steps"]):
        assert torch.equal(times[i], t[f"model_t_step{i}"]), i
        assert_close(outputs[i], t[f"model_output_step{i}"], tol, f"mf_sampler/model_output_step{i}")
    # RNG: exactly 1 + steps draws of this shape from the global generator.
    torch.manual_seed(case["seed"])
    assert torch.equal(torch.randn(t["concat_cond"].shape), t["initial_noise"])
    for _ in range(case["config"]["steps"]):
        torch.randn(t["concat_cond"].shape)
    after_expected = torch.randn(3)
    torch.manual_seed(case["seed"])
    sampler.model_apply = original_apply
    sampler(t["concat_cond"].shape, case["config"]["steps"], extra_args=_sampler_extra_args(t, 2))
    assert torch.equal(torch.randn(3), after_expected)


def test_mf_sampler_batched_cfg_matches_two_passes(pipe):
    """One UNet call per step with both guidance branches is the same math as two calls."""
    case, t = load_case("mf_sampler")
    torch.manual_seed(case["seed"])
    latents = SamplerDynamicTSNR(pipe.unet)(t["concat_cond"].shape, case["config"]["steps"],
                                            extra_args=_sampler_extra_args(t, 1), batch_cfg=True)
    assert_close(latents, t["latents"], case["tolerance"], "mf_sampler/latents_batched_cfg")


def test_batch_randn_draws_what_each_generator_draws_alone():
    shape = (3, 4, 2, 5, 6)
    seeds = (7, 8, 9)
    together = [torch.Generator().manual_seed(s) for s in seeds]
    alone = [torch.Generator().manual_seed(s) for s in seeds]
    for _ in range(3):  # every later draw too, as the sampler draws once per step
        drawn = batch_randn(shape, together, torch.device("cpu"), torch.float32)
        expected = torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in alone])
        assert torch.equal(drawn, expected)
    one = torch.Generator().manual_seed(1)
    assert torch.equal(batch_randn(shape, one, torch.device("cpu"), torch.float32),
                       torch.randn(shape, generator=torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        batch_randn(shape, together[:2], torch.device("cpu"), torch.float32)


def test_pipeline_samples_several_clips_as_each_alone(pipe):
    """Segment batching: clips with their own conditions and seeds, sampled as one batch, get each
    clip's own result (the conditions shared by all clips are given once)."""
    _, t = load_case("mf_sampler")
    first = {k: t[k][:1] for k in ("concat_cond", "positive_image_cond", "negative_image_cond",
                                   "positive_text_cond", "negative_text_cond")}
    g = torch.Generator().manual_seed(3)
    concat = torch.cat([first["concat_cond"], torch.randn(first["concat_cond"].shape, generator=g)])
    image = torch.cat([first["positive_image_cond"], torch.randn(first["positive_image_cond"].shape, generator=g)])
    common = dict(steps=2, guidance_scale=7.5, positive_text_cond=first["positive_text_cond"],
                  negative_text_cond=first["negative_text_cond"], negative_image_cond=first["negative_image_cond"],
                  fs=3)
    together = pipe(positive_image_cond=image, concat_cond=concat,
                    generator=[torch.Generator().manual_seed(s) for s in (11, 12)], **common)
    for i, seed in enumerate((11, 12)):
        alone = pipe(positive_image_cond=image[i:i + 1], concat_cond=concat[i:i + 1],
                     generator=torch.Generator().manual_seed(seed), **common)
        assert (together[i:i + 1] - alone).abs().max().item() < 1e-4  # float32 noise of other batch sizes
    assert (together[0] - together[1]).abs().max().item() > 0.01  # two different clips
    with pytest.raises(ValueError, match="does not fit a batch of 2"):
        pipe(positive_image_cond=torch.cat([image, image[:1]]), concat_cond=concat,
             generator=[torch.Generator().manual_seed(s) for s in (11, 12)], **common)


def test_pipeline_call_matches_sampler_golden(pipe):
    case, t = load_case("mf_sampler")
    torch.manual_seed(case["seed"])
    latents = pipe(
        batch_size=1, steps=case["config"]["steps"], guidance_scale=7.5,
        positive_text_cond=t["positive_text_cond"], negative_text_cond=t["negative_text_cond"],
        positive_image_cond=t["positive_image_cond"], negative_image_cond=t["negative_image_cond"],
        concat_cond=t["concat_cond"], fs=3,
    )
    assert_close(latents, t["latents"], case["tolerance"], "mf_sampler/latents_via_pipeline")


# -- the NaN fix -----------------------------------------------------------------------------------


def _first_step_terms(steps: int):
    sampler = SamplerDynamicTSNR(torch.nn.Linear(1, 1))
    ts = torch.tensor(uniform_trailing_timesteps(steps))
    prev = torch.nn.functional.pad(ts[:-1], (1, 0))
    a, a_prev = sampler.alphas_cumprod[ts], sampler.alphas_cumprod[prev]
    s_x = torch.ones(1, 1, 1, 1, 1)
    return a_prev[-1].item() * s_x, ddim_sigmas(a, a_prev)[-1].item() * s_x, a, a_prev


@pytest.mark.parametrize("steps", range(1, 61))
def test_ddim_sigmas_round_exactly_like_the_original(steps):
    """The original computed sigmas through a numpy/torch mix; ours must give the same bits."""
    import numpy as np

    _, _, a, a_prev = _first_step_terms(steps)
    with np.errstate(all="ignore"):
        original = 1.0 * np.sqrt((1 - a_prev.numpy()) / (1 - a) * (1 - a / a_prev.numpy()))
    assert torch.equal(ddim_sigmas(a, a_prev), torch.as_tensor(original))


@pytest.mark.parametrize("steps", [6, 11, 14, 15, 20, 23, 25])
def test_first_step_direction_term_is_clamped_where_original_gives_nan(steps):
    a_prev, sigma, _, _ = _first_step_terms(steps)
    assert torch.isnan((1.0 - a_prev - sigma**2).sqrt()).all(), "the original's expression is NaN here"
    assert torch.equal(ddim_direction_scale(a_prev, sigma), torch.zeros_like(a_prev))


@pytest.mark.parametrize("steps", [3, 4, 5, 50])
def test_direction_term_unchanged_where_original_is_finite(steps):
    a_prev, sigma, _, _ = _first_step_terms(steps)
    assert torch.equal(ddim_direction_scale(a_prev, sigma), (1.0 - a_prev - sigma**2).sqrt())


class _StubVideoUNet(torch.nn.Module):
    """Cheap stand-in with the UNet3D call signature (for sampler-only behaviour)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.3))

    def forward(self, x, timesteps, context_text=None, context_img=None, concat_cond=None, fs=None):
        return self.scale * x + 0.01 * context_text.mean() + 0.1 * concat_cond


@pytest.mark.parametrize("steps", [3, 6, 25, 61, 103])
def test_sampler_output_is_finite_at_every_step_count(steps):
    unet = _StubVideoUNet()
    cond = torch.randn(1, 4, 16, 2, 3)
    text = torch.randn(1, 5, 8)
    extra = dict(cfg_scale=7.5, positive=dict(context_text=text, concat_cond=cond),
                 negative=dict(context_text=text * 0, concat_cond=cond))
    torch.manual_seed(0)
    out = SamplerDynamicTSNR(unet)(cond.shape, steps, extra_args=extra)
    assert torch.isfinite(out).all()


def test_sampler_callback_can_cancel_between_steps():
    unet = _StubVideoUNet()
    cond = torch.randn(1, 4, 16, 2, 3)
    extra = dict(cfg_scale=2.0, positive=dict(context_text=torch.ones(1, 2, 2), concat_cond=cond),
                 negative=dict(context_text=torch.zeros(1, 2, 2), concat_cond=cond))
    seen = []

    class Cancelled(Exception):
        pass

    def callback(info):
        seen.append(info["i"])
        if info["i"] == 1:
            raise Cancelled

    with pytest.raises(Cancelled):
        SamplerDynamicTSNR(unet)(cond.shape, 5, extra_args=extra, callback=callback)
    assert seen == [0, 1]


# -- import hygiene ------------------------------------------------------------------------------


def test_import_touches_no_gpu_and_no_network():
    code = (
        "import socket, torch\n"
        "def boom(*a, **k): raise AssertionError('touched at import')\n"
        "torch.cuda._lazy_init = boom; torch.cuda.init = boom\n"
        "socket.socket.connect = boom\n"
        "import diffusers_vdm, diffusers_vdm.pipeline\n"
        "assert not torch.cuda.is_initialized()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("channels_last", [False, True])
def test_unet_compiles_as_one_graph_with_identical_output(tiny_mf_repo, monkeypatch, channels_last):
    """The opt-in torch.compile path: no graph breaks, same numbers (eager backend keeps CI fast),
    also with the channels-last layout and the group norms the GPU takes with it."""
    from diffusers_vdm import normalization

    monkeypatch.setattr(normalization, "native_group_norm_keeps_channels_last", lambda device: False)
    unet = LatentVideoDiffusionPipeline.from_pretrained(tiny_mf_repo).unet
    unet.set_channels_last(channels_last)
    _, t = load_case("mf_unet")
    kwargs = dict(context_text=t["context_text"], context_img=t["context_img"], concat_cond=t["concat_cond"], fs=t["fs"])
    with torch.inference_mode():
        eager = unet(t["x"], t["timesteps"], **kwargs)
        unet.compile(backend="eager", fullgraph=True)
        compiled = unet(t["x"], t["timesteps"], **kwargs)
    assert torch.equal(eager, compiled)
