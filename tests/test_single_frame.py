"""Single-frame half: ModifiedUNet, text encoder, VAE and the k-diffusion sampler against the golden vectors.

Everything runs on CPU in float32 on the tiny derived-weight repository (``tiny_sf_repo``), loaded with the
same ``from_pretrained`` calls as the real checkpoints.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from golden import assert_close, load_case, reference_config, reference_keys
from safetensors.torch import load_file

from single_frame import KDiffusionSampler, ModifiedUNet, encode_cropped_prompt_77tokens, encode_prompt
from single_frame.k_diffusion import KModel, get_sigmas_karras, sigma_to_timestep

ROOT = Path(__file__).resolve().parent.parent


def _assert_state_dict_equals_file(state_dict: dict[str, torch.Tensor], path: Path, prefix: str = "") -> None:
    """Every checkpoint key consumed, none missing, values identical."""
    on_disk = load_file(str(path))
    got = {prefix + k if prefix and not k.startswith(prefix) else k: v for k, v in state_dict.items()}
    assert set(got) == set(on_disk), f"missing={set(on_disk) - set(got)} extra={set(got) - set(on_disk)}"
    bad = [k for k in on_disk if not torch.equal(got[k].cpu(), on_disk[k])]
    assert not bad, f"values differ from the checkpoint: {bad[:5]}"


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def unet(tiny_sf_repo: Path) -> ModifiedUNet:
    return ModifiedUNet.from_pretrained(tiny_sf_repo, subfolder="unet").eval()


@pytest.fixture(scope="module")
def text_models(tiny_sf_repo: Path):
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_sf_repo / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(tiny_sf_repo / "text_encoder").eval()
    return tokenizer, text_encoder


@pytest.fixture(scope="module")
def vae(tiny_sf_repo: Path):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(tiny_sf_repo, subfolder="vae").eval()


# ------------------------------------------------------------------------------------------------ UNet


def test_unet_loads_every_key(unet: ModifiedUNet, tiny_sf_repo: Path) -> None:
    _assert_state_dict_equals_file(unet.state_dict(), tiny_sf_repo / "unet" / "diffusion_pytorch_model.safetensors")
    assert unet.conv_in.in_channels == 8 and unet.config.in_channels == 4
    assert unet.config.addition_embed_type is None


def test_unet_strict_loading_rejects_incomplete_checkpoint(tiny_sf_repo: Path, tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(tiny_sf_repo / "unet", tmp_path / "unet")
    path = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(path))
    del sd["add_embedding.linear_1.bias"]
    save_file(sd, str(path), metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="add_embedding.linear_1.bias"):
        ModifiedUNet.from_pretrained(tmp_path, subfolder="unet")


def test_sf_unet_golden(unet: ModifiedUNet) -> None:
    case, t = load_case("sf_unet")
    tol = case["tolerance"]
    with torch.no_grad():
        out_orig = unet(
            t["sample"],
            t["timestep"],
            t["encoder_hidden_states"],
            cross_attention_kwargs={"concat_conds": t["concat_conds"], "coded_conds": t["coded_conds"]},
        ).sample
        out_explicit = unet(
            t["sample"],
            t["timestep"],
            encoder_hidden_states=t["encoder_hidden_states"],
            concat_conds=t["concat_conds"],
            coded_conds=t["coded_conds"],
            return_dict=False,
        )[0]
        aug_emb = unet.get_aug_embed(
            emb=torch.zeros(3, 1280), encoder_hidden_states=None, added_cond_kwargs={"coded_conds": t["coded_conds"]}
        )
    err_out = assert_close(out_orig, t["out"], tol, "sf_unet.out")
    err_aug = assert_close(aug_emb, t["aug_emb"], tol, "sf_unet.aug_emb")
    assert torch.equal(out_orig, out_explicit), "the two call styles differ"
    print(f"sf_unet: out max abs err {err_out:.3g}, aug_emb max abs err {err_aug:.3g}")


def test_unet_requires_both_conds(unet: ModifiedUNet) -> None:
    x = torch.zeros(1, 4, 8, 8)
    ctx = torch.zeros(1, 77, 32)
    with pytest.raises(ValueError, match="concat_conds"):
        unet(x, torch.tensor([1]), ctx, coded_conds=torch.tensor([1]))
    with pytest.raises(ValueError, match="coded_conds"):
        unet(x, torch.tensor([1]), ctx, concat_conds=torch.zeros(1, 4, 8, 8))


# ------------------------------------------------------------------------------------------------ text


def test_sf_text_golden(text_models, tiny_sf_repo: Path) -> None:
    tokenizer, text_encoder = text_models
    # transformers 5 keeps CLIPTextModel params without the on-disk `text_model.` prefix.
    _assert_state_dict_equals_file(
        text_encoder.state_dict(), tiny_sf_repo / "text_encoder" / "model.safetensors", prefix="text_model."
    )
    case, t = load_case("sf_text")
    prompts = case["inputs"]["prompts"]
    ids = torch.cat(
        [
            tokenizer(p, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            for p in prompts
        ]
    )
    assert torch.equal(ids, t["input_ids"]), "input_ids differ"
    states = torch.cat([encode_cropped_prompt_77tokens(p, tokenizer, text_encoder) for p in prompts])
    err = assert_close(states, t["last_hidden_state"], case["tolerance"], "sf_text.last_hidden_state")
    print(f"sf_text: last_hidden_state max abs err {err:.3g}")


def test_long_prompt_mode(text_models) -> None:
    tokenizer, text_encoder = text_models
    short = "1girl, solo, long hair, smile"
    assert torch.equal(
        encode_prompt(short, tokenizer, text_encoder, long_prompt=True),
        encode_cropped_prompt_77tokens(short, tokenizer, text_encoder),
    )
    assert torch.equal(
        encode_prompt("", tokenizer, text_encoder, long_prompt=True),
        encode_cropped_prompt_77tokens("", tokenizer, text_encoder),
    )
    assert torch.equal(
        encode_prompt(short, tokenizer, text_encoder), encode_cropped_prompt_77tokens(short, tokenizer, text_encoder)
    )

    long = ", ".join(["1girl, solo, long hair, smile, blue eyes"] * 6)
    n_tokens = len(tokenizer(long, add_special_tokens=False).input_ids)
    assert 75 < n_tokens <= 150, n_tokens
    emb = encode_prompt(long, tokenizer, text_encoder, long_prompt=True)
    dim = text_encoder.config.hidden_size
    assert emb.shape == (1, 154, dim)
    assert torch.equal(emb[:, :77], encode_cropped_prompt_77tokens(long, tokenizer, text_encoder))
    # max_chunks caps the length
    assert encode_prompt(long, tokenizer, text_encoder, long_prompt=True, max_chunks=1).shape == (1, 77, dim)


# ------------------------------------------------------------------------------------------------ VAE


def test_sf_vae_golden(vae, tiny_sf_repo: Path) -> None:
    _assert_state_dict_equals_file(vae.state_dict(), tiny_sf_repo / "vae" / "diffusion_pytorch_model.safetensors")
    case, t = load_case("sf_vae")
    tol = case["tolerance"]
    image = t["image_uint8"].float()[None].movedim(-1, 1) / 127.5 - 1.0
    with torch.no_grad():
        latents = vae.encode(image).latent_dist.mode() * vae.config.scaling_factor
        decoded = vae.decode(t["latents_to_decode"] / vae.config.scaling_factor).sample
    err_enc = assert_close(latents, t["latents_encoded"], tol, "sf_vae.latents_encoded")
    err_dec = assert_close(decoded, t["decoded"], tol, "sf_vae.decoded")
    print(f"sf_vae: latents_encoded max abs err {err_enc:.3g}, decoded max abs err {err_dec:.3g}")


# ------------------------------------------------------------------------------------------------ sampler


def _run_sampler(sampler: KDiffusionSampler, t: dict, same_noise: bool, callback=None, generator=None):
    return sampler(
        initial_latent=torch.zeros(1, 4, 16, 12),
        strength=1.0,
        num_inference_steps=4,
        guidance_scale=3.0,
        batch_size=3,
        generator=generator if generator is not None else torch.Generator("cpu").manual_seed(12345),
        prompt_embeds=t["prompt_embeds"],
        negative_prompt_embeds=t["negative_prompt_embeds"],
        cross_attention_kwargs={"concat_conds": t["concat_conds"], "coded_conds": t["coded_conds"]},
        same_noise_in_batch=same_noise,
        progress_tqdm=lambda it: it,
        callback=callback,
    )


def test_sf_sampler_schedules() -> None:
    case, t = load_case("sf_sampler")
    tol_s = case["tolerance_sigmas"]
    k_model = KModel(None, timesteps=1000, linear_start=0.00085, linear_end=0.020, linear=True)
    sampler = KDiffusionSampler(None, timesteps=1000, linear_start=0.00085, linear_end=0.020, linear=True)
    errs = {"kmodel_sigmas": assert_close(k_model.sigmas, t["kmodel_sigmas"], tol_s, "kmodel_sigmas")}
    for name, steps, strength in (
        ("sigmas_steps4", 4, 1.0),
        ("sigmas_steps50", 50, 1.0),
        ("sigmas_steps4_strength0.5", 4, 0.5),
    ):
        sigmas = sampler.sigmas_for(steps, strength)
        errs[name] = assert_close(sigmas, t[name], tol_s, name)
    for steps in (4, 50):
        ts = k_model.timestep(sampler.sigmas_for(steps)[:-1])
        assert ts.dtype == torch.int64 and torch.equal(ts, t[f"timesteps_steps{steps}"]), f"timesteps_steps{steps}"
        assert torch.equal(ts, sigma_to_timestep(t[f"sigmas_steps{steps}"][:-1], k_model.log_sigmas))
    # the pure function with float bounds gives the same table
    assert torch.equal(
        get_sigmas_karras(4, float(k_model.sigma_min), float(k_model.sigma_max)), k_model.get_sigmas_karras(4)
    )
    print("sf_sampler schedules: " + ", ".join(f"{k} {v:.3g}" for k, v in errs.items()))


def test_sf_sampler_golden(unet: ModifiedUNet) -> None:
    case, t = load_case("sf_sampler")
    tol, tol_s = case["tolerance"], case["tolerance_sigmas"]
    sampler = KDiffusionSampler(unet, timesteps=1000, linear_start=0.00085, linear_end=0.020, linear=True)

    steps: list[dict] = []
    generator = torch.Generator("cpu").manual_seed(12345)
    final = _run_sampler(sampler, t, same_noise=True, callback=steps.append, generator=generator)

    # RNG: exactly one draw of [1,4,h,w]
    reference_gen = torch.Generator("cpu").manual_seed(12345)
    first = torch.randn([1, 4, 16, 12], generator=reference_gen)
    assert torch.equal(torch.randn(5, generator=generator), torch.randn(5, generator=reference_gen))
    errs = {"initial_noise": assert_close(first, t["initial_noise"], tol, "initial_noise")}
    x0_noise = steps[0]["x"] / steps[0]["sigma"]
    errs["x0/sigma0"] = assert_close(x0_noise, t["initial_noise"].repeat(3, 1, 1, 1), tol_s, "x0 / sigma0")

    assert [s["i"] for s in steps] == [0, 1, 2, 3]
    errs["step_x"] = assert_close(torch.stack([s["x"] for s in steps]), t["step_x"], tol, "step_x")
    errs["step_sigma"] = assert_close(
        torch.stack([s["sigma"] * torch.ones(3) for s in steps]), t["step_sigma"], tol_s, "step_sigma"
    )
    errs["step_denoised"] = assert_close(
        torch.stack([s["denoised"] for s in steps]), t["step_denoised"], tol, "step_denoised"
    )
    errs["final_latents"] = assert_close(final, t["final_latents"], tol, "final_latents")

    final_nsn = _run_sampler(sampler, t, same_noise=False)
    errs["final_latents_same_noise_false"] = assert_close(
        final_nsn, t["final_latents_same_noise_false"], tol, "final_latents_same_noise_false"
    )
    print("sf_sampler: " + ", ".join(f"{k} {v:.3g}" for k, v in errs.items()))


def test_sampler_batched_cfg_matches(unet: ModifiedUNet) -> None:
    _, t = load_case("sf_sampler")
    kwargs = dict(timesteps=1000, linear_start=0.00085, linear_end=0.020, linear=True)
    two_calls = _run_sampler(KDiffusionSampler(unet, **kwargs), t, same_noise=True)
    batched = _run_sampler(KDiffusionSampler(unet, batched_cfg=True, **kwargs), t, same_noise=True)
    # latents reach ~10^3 with random weights; fp32 reordering noise only
    torch.testing.assert_close(batched, two_calls, rtol=1e-5, atol=1e-2)


def test_sampler_callback_can_cancel(unet: ModifiedUNet) -> None:
    _, t = load_case("sf_sampler")
    sampler = KDiffusionSampler(unet, timesteps=1000, linear_start=0.00085, linear_end=0.020, linear=True)

    class Cancelled(Exception):
        pass

    def cancel(info: dict) -> None:
        if info["i"] == 1:
            raise Cancelled

    with pytest.raises(Cancelled):
        _run_sampler(sampler, t, same_noise=True, callback=cancel)


# ------------------------------------------------------------------------------------------------ layouts


def _meta_layout(module: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def test_full_size_unet_layout() -> None:
    with torch.device("meta"):
        model = ModifiedUNet.from_config(reference_config("sf_unet"))
    assert _meta_layout(model) == reference_keys("sf_unet")


def test_full_size_vae_layout() -> None:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        model = AutoencoderKL(**reference_config("sf_vae"))
    assert _meta_layout(model) == reference_keys("sf_vae")


def test_full_size_text_encoder_layout() -> None:
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig(**reference_config("sf_text_encoder")))
    layout = {
        (k if k.startswith("text_model.") else "text_model." + k): v for k, v in _meta_layout(model).items()
    }
    assert layout == reference_keys("sf_text_encoder")


# ------------------------------------------------------------------------------------------------ import


def test_import_is_cheap() -> None:
    code = (
        "import sys, torch, single_frame\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised'\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
