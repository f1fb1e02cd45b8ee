"""Step 2: keyframes of the drawing process at chosen operation ("undo") steps (the original ``process``)."""

from __future__ import annotations

import logging
import math
from typing import Any, Optional, Sequence

import numpy as np
import torch

from .errors import InvalidInputError
from .images import ImageSource, load_image_rgb, numpy2pytorch, pytorch2numpy, resize_and_center_crop
from .models import ModelManager, default_manager
from .progress import CancelFlag, ProgressCallback, ProgressEvent, RunControl
from .runtime import out_of_memory_guard

logger = logging.getLogger(__name__)

DEFAULT_UNDO_STEPS = (400, 600, 800, 900, 950, 999)
DEFAULT_NEGATIVE_PROMPT = "lowres, bad anatomy, bad hands, cropped, worst quality"
DEFAULT_SEED = 12345
DEFAULT_WIDTH = 512
DEFAULT_HEIGHT = 640
DEFAULT_STEPS = 50
DEFAULT_CFG = 3.0
MAX_SIDE = 2048


def validate_keyframe_settings(undo_steps: Sequence[Any], width: Any, height: Any, steps: Any, cfg: Any,
                               seed: Any) -> tuple[list[int], int, int, int, float, int]:
    """Normalised settings, or ``InvalidInputError`` naming the first bad one."""
    try:
        steps_list = [int(s) for s in undo_steps]
    except (TypeError, ValueError):
        raise InvalidInputError("Operation steps must be whole numbers between 0 and 999.") from None
    if not steps_list:
        raise InvalidInputError("Choose at least one operation step (0-999).")
    if any(s < 0 or s > 999 for s in steps_list):
        raise InvalidInputError("Operation steps must be between 0 and 999.")
    try:
        width_i, height_i, steps_i, seed_i, cfg_f = int(width), int(height), int(steps), int(seed), float(cfg)
    except (TypeError, ValueError):
        raise InvalidInputError("Width, height, steps and seed must be whole numbers and CFG a number.") from None
    for name, value in (("width", width_i), ("height", height_i)):
        if value < 64 or value > MAX_SIDE or value % 8:
            raise InvalidInputError(f"The image {name} must be a multiple of 8 between 64 and {MAX_SIDE}, got {value}.")
    if steps_i < 1 or steps_i > 1000:
        raise InvalidInputError(f"Steps must be between 1 and 1000, got {steps_i}.")
    if not math.isfinite(cfg_f) or cfg_f <= 0:
        raise InvalidInputError(f"CFG scale must be a positive number, got {cfg}.")
    if seed_i < 0 or seed_i >= 2**63:
        raise InvalidInputError(f"The seed must be between 0 and 2**63 - 1, got {seed_i}.")
    return steps_list, width_i, height_i, steps_i, cfg_f, seed_i


def generate_keyframes(
    image: ImageSource,
    prompt: str,
    undo_steps: Sequence[int] = DEFAULT_UNDO_STEPS,
    width: int = DEFAULT_WIDTH,
    height: int = DEFAULT_HEIGHT,
    seed: int = DEFAULT_SEED,
    steps: int = DEFAULT_STEPS,
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT,
    cfg: float = DEFAULT_CFG,
    *,
    models: Optional[ModelManager] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: CancelFlag = None,
    long_prompt: bool = False,
) -> list[np.ndarray]:
    """Keyframes for ``image``: ``[cropped input] + one per undo step (input order) + [white canvas]``.

    All are uint8 HxWx3 RGB at ``height x width``. Identical to the original's ``process`` for the
    same weights, inputs and seed. ``long_prompt`` (opt-in) encodes prompts over 75 tokens in
    chunks instead of truncating them. ``cancel`` is checked between sampler steps.
    """
    from single_frame import encode_prompt

    undo_steps, width, height, steps, cfg, seed = validate_keyframe_settings(undo_steps, width, height, steps, cfg, seed)
    rgb = load_image_rgb(image)
    prompt = "" if prompt is None else str(prompt)
    negative_prompt = "" if negative_prompt is None else str(negative_prompt)
    models = models or default_manager()
    control = RunControl(progress, cancel)
    control.check()

    sf = models.single_frame()
    memory = models.memory
    vae, unet, text_encoder = sf.vae, sf.unet, sf.text_encoder

    with out_of_memory_guard(models), torch.inference_mode():
        # Same generator device as the original (the compute device), so GPU runs match it too.
        rng = torch.Generator(device=memory.device).manual_seed(seed)

        memory.load_models_to_gpu(vae)
        fg = resize_and_center_crop(rgb, width, height)
        concat_conds = numpy2pytorch([fg]).to(device=vae.device, dtype=vae.dtype)
        concat_conds = vae.encode(concat_conds).latent_dist.mode() * vae.config.scaling_factor
        control.check()

        memory.load_models_to_gpu(text_encoder)
        conds = encode_prompt(prompt, sf.tokenizer, text_encoder, long_prompt=long_prompt)
        unconds = encode_prompt(negative_prompt, sf.tokenizer, text_encoder, long_prompt=long_prompt)
        control.check()

        memory.load_models_to_gpu(unet)
        fs = torch.tensor(undo_steps).to(device=unet.device, dtype=torch.long)
        initial_latents = torch.zeros_like(concat_conds)
        concat_conds = concat_conds.to(device=unet.device, dtype=unet.dtype)
        control.report(ProgressEvent("keyframes", 0, steps))
        latents = sf.sampler(
            initial_latent=initial_latents,
            strength=1.0,
            num_inference_steps=steps,
            guidance_scale=cfg,
            batch_size=len(undo_steps),
            generator=rng,
            prompt_embeds=conds,
            negative_prompt_embeds=unconds,
            cross_attention_kwargs={"concat_conds": concat_conds, "coded_conds": fs},
            same_noise_in_batch=True,
            progress_tqdm=control.progress_tqdm,
            callback=control.sampler_callback("keyframes", steps),
        ).to(vae.dtype) / vae.config.scaling_factor

        memory.load_models_to_gpu(vae)
        latents = latents.to(vae.device)
        if memory.keyframe_decode_one_at_a_time:
            pixels = torch.cat([vae.decode(latent[None]).sample for latent in latents])
        else:
            pixels = vae.decode(latents).sample
        frames = pytorch2numpy(pixels)

    return [fg] + frames + [np.zeros_like(fg) + 255]
