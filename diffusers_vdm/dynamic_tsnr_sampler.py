"""DDIM sampler for the v-prediction video UNet with zero-terminal-SNR schedule and dynamic x0 rescale.

Schedule and solver are small pure functions (k-diffusion style); ``SamplerDynamicTSNR`` wires them
to the UNet with the original's call convention and random-number consumption:
``torch.randn(shape)`` once for the initial latent, then one ``randn_like`` per step, including
the last. Arithmetic is float32 in the original's order so outputs match it bit for bit in
practice; the one deliberate change is :func:`ddim_direction_scale`, which clamps a term that
rounds below zero at t=999 for some step counts (the original then produced NaN = black video).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .modeling import module_device, module_dtype

N_TIMESTEPS = 1000
LINEAR_START = 0.00085
LINEAR_END = 0.012
TERMINAL_SCALE = 0.7
TURNING_STEP = 400
GUIDANCE_RESCALE = 0.7

Generators = Union[None, torch.Generator, Sequence[torch.Generator]]


def batch_randn(shape: Sequence[int], generator: Generators, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``torch.randn(shape)`` from ``generator``, or with one generator per batch entry.

    Per-entry generators let clips that were sampled one at a time (each seeded its own way) be
    sampled as one batch with the same noise: entry ``i`` draws exactly what its own run drew.
    """
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}.")
    entry = (1, *shape[1:])
    return torch.cat([torch.randn(entry, generator=g, device=device, dtype=dtype) for g in generator])


def scaled_linear_betas(linear_start: float, linear_end: float, n_timestep: int) -> np.ndarray:
    """Betas linear in sqrt space (float64), the Stable Diffusion schedule."""
    return np.linspace(linear_start**0.5, linear_end**0.5, n_timestep, dtype=np.float64) ** 2


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift/scale sqrt(alphas_cumprod) so the last step has zero SNR (Lin et al. 2023)."""
    alphas_bar_sqrt = np.sqrt(np.cumprod(1.0 - betas, axis=0))
    first, last = alphas_bar_sqrt[0].copy(), alphas_bar_sqrt[-1].copy()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1.0 - alphas


def dynamic_x0_scales(n_timestep: int = N_TIMESTEPS, terminal_scale: float = TERMINAL_SCALE,
                      turning_step: int = TURNING_STEP) -> np.ndarray:
    """x0 scale per timestep: 1 -> ``terminal_scale`` over the first ``turning_step`` steps, then flat."""
    return np.concatenate([
        np.linspace(1.0, terminal_scale, turning_step),
        np.full(n_timestep - turning_step, terminal_scale),
    ])


def uniform_trailing_timesteps(steps: int, n_timestep: int = N_TIMESTEPS) -> np.ndarray:
    """``steps`` timesteps ending at ``n_timestep - 1``, ascending (int64).

    For some step counts above 60 (61, 103, 121, ...) ``arange`` yields an extra value that rounds
    to timestep -1, which the original indexed as 999 and turned into NaN; it is clipped to 0.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}.")
    c = n_timestep / steps
    return np.maximum(np.flip(np.round(np.arange(n_timestep, 0, -c))).astype(np.int64) - 1, 0)


def ddim_sigmas(alphas: torch.Tensor, alphas_prev: torch.Tensor, eta: float = 1.0) -> torch.Tensor:
    """DDIM noise scale ``eta * sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))`` per step, float32.

    Evaluated exactly as the original's numpy/torch mix rounds it: its ``ndarray / tensor``
    dispatched to ``Tensor.__rtruediv__`` (reciprocal, then multiply) and the root was numpy's.
    Bit-identical sigmas are what keep the t=999 direction term on the same side of zero.
    """
    ratio = (1 - alphas_prev) * (1 - alphas).reciprocal()
    inner = (ratio * (1 - alphas / alphas_prev)).cpu().numpy()
    return eta * torch.from_numpy(np.sqrt(inner))


def rescale_noise_cfg(noise_cfg: torch.Tensor, noise_pred_text: torch.Tensor, guidance_rescale: float = 0.0) -> torch.Tensor:
    """Blend the CFG output with a copy rescaled to the conditional prediction's std (unbiased)."""
    dims = list(range(1, noise_pred_text.ndim))
    std_text = noise_pred_text.std(dim=dims, keepdim=True)
    std_cfg = noise_cfg.std(dim=dims, keepdim=True)
    rescaled = noise_cfg * (std_text / std_cfg)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * noise_cfg


def ddim_direction_scale(a_prev: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
    """``sqrt(1 - a_prev - sigma_t**2)``, clamped at 0.

    At t=999 with zero terminal SNR the argument is exactly 0 in exact arithmetic, but float32
    rounding makes it slightly negative for some step counts (6, 11, 14, 15, 20, 23, 25, ...).
    The original took the square root anyway and produced NaN; clamping changes nothing where
    the original was finite.
    """
    return (1.0 - a_prev - sigma_t**2).clamp(min=0).sqrt()


class SamplerDynamicTSNR(nn.Module):
    """v-prediction DDIM (eta = 1) with zero-terminal-SNR betas, dynamic x0 rescale and CFG rescale."""

    def __init__(self, unet: nn.Module, terminal_scale: float = TERMINAL_SCALE):
        super().__init__()
        self.unet = unet
        self.is_v = True
        self.n_timestep = N_TIMESTEPS
        self.guidance_rescale = GUIDANCE_RESCALE

        betas = rescale_zero_terminal_snr(scaled_linear_betas(LINEAR_START, LINEAR_END, N_TIMESTEPS))
        alphas_cumprod = np.cumprod(1.0 - betas, axis=0)
        device = module_device(unet)
        as_f32 = lambda a: torch.tensor(a, dtype=torch.float32, device=device)  # noqa: E731
        self.register_buffer("alphas_cumprod", as_f32(alphas_cumprod))
        self.register_buffer("sqrt_alphas_cumprod", as_f32(np.sqrt(alphas_cumprod)))
        self.register_buffer("sqrt_one_minus_alphas_cumprod", as_f32(np.sqrt(1.0 - alphas_cumprod)))
        self.register_buffer("scale_arr", as_f32(dynamic_x0_scales(N_TIMESTEPS, terminal_scale)))

    def predict_eps_from_z_and_v(self, x_t: torch.Tensor, t: int, v: torch.Tensor) -> torch.Tensor:
        return self.sqrt_alphas_cumprod[t] * v + self.sqrt_one_minus_alphas_cumprod[t] * x_t

    def predict_start_from_z_and_v(self, x_t: torch.Tensor, t: int, v: torch.Tensor) -> torch.Tensor:
        return self.sqrt_alphas_cumprod[t] * x_t - self.sqrt_one_minus_alphas_cumprod[t] * v

    def get_uniform_trailing_steps(self, steps: int) -> torch.Tensor:
        return torch.tensor(uniform_trailing_timesteps(steps, self.n_timestep), device=self.alphas_cumprod.device)

    @torch.no_grad()
    def forward(
        self,
        latent_shape,
        steps: int,
        extra_args: dict[str, Any],
        progress_tqdm: Optional[Callable] = None,
        callback: Optional[Callable[[dict], None]] = None,
        generator: Generators = None,
        batch_cfg: bool = False,
    ) -> torch.Tensor:
        """Sample latents of ``latent_shape`` (b, c, t, h, w).

        ``extra_args``: ``cfg_scale`` plus ``positive``/``negative`` UNet kwargs. Noise comes from the
        global RNG (as the original) unless ``generator`` is given (one, or one per batch entry). ``callback`` receives
        ``{'x', 'i', 't', 'denoised'}`` after every step and may raise to cancel. ``batch_cfg``
        runs the two guidance branches as one batch of 2 (same math, one UNet call per step).
        """
        bar = progress_tqdm if progress_tqdm is not None else _default_progress
        device, dtype = module_device(self.unet), module_dtype(self.unet)
        eta = 1.0

        timesteps = self.get_uniform_trailing_steps(steps)
        timesteps_prev = torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))

        x = batch_randn(latent_shape, generator, device, dtype)

        alphas = self.alphas_cumprod[timesteps]
        alphas_prev = self.alphas_cumprod[timesteps_prev]
        scales = self.scale_arr[timesteps]
        scales_prev = self.scale_arr[timesteps_prev]
        sigmas = ddim_sigmas(alphas, alphas_prev, eta)
        alphas_prev, sigmas, scales, scales_prev = (a.cpu() for a in (alphas_prev, sigmas, scales, scales_prev))

        s_in = x.new_ones((x.shape[0],))
        s_x = x.new_ones((x.shape[0],) + (1,) * (x.ndim - 1))
        for i in bar(range(len(timesteps))):
            index = len(timesteps) - 1 - i
            t = int(timesteps[index].item())

            v = self.model_apply(x, t * s_in, batch_cfg=batch_cfg, **extra_args)
            e_t = self.predict_eps_from_z_and_v(x, t, v)
            pred_x0 = self.predict_start_from_z_and_v(x, t, v)

            a_prev = alphas_prev[index].item() * s_x
            sigma_t = sigmas[index].item() * s_x
            # Dynamic rescale: undo this step's x0 scale, apply the previous (less noisy) step's.
            rescale = (scales_prev[index].item() * s_x) / (scales[index].item() * s_x)
            pred_x0 = pred_x0 * rescale

            dir_xt = ddim_direction_scale(a_prev, sigma_t) * e_t
            noise = sigma_t * batch_randn(x.shape, generator, x.device, x.dtype)
            x = a_prev.sqrt() * pred_x0 + dir_xt + noise
            if callback is not None:
                callback({"x": x, "i": i, "t": t, "denoised": pred_x0})
        return x

    @torch.no_grad()
    def model_apply(self, x: torch.Tensor, t: torch.Tensor, cfg_scale: float, positive: dict, negative: dict,
                    batch_cfg: bool = False) -> torch.Tensor:
        """Guided v-prediction: ``n + cfg * (p - n)``, then rescaled towards ``p``'s std by 0.7."""
        x = x.to(device=module_device(self.unet), dtype=module_dtype(self.unet))
        if batch_cfg:
            b = x.shape[0]
            both = {k: _cat_pair(positive[k], negative[k], b) for k in positive}
            p, n = self.unet(torch.cat([x, x]), torch.cat([t, t]), **both).chunk(2)
        else:
            p = self.unet(x, t, **positive)
            n = self.unet(x, t, **negative)
        o = n + cfg_scale * (p - n)
        return rescale_noise_cfg(o, p, guidance_rescale=self.guidance_rescale)


def _cat_pair(positive, negative, batch: int):
    """Stack a positive/negative kwarg pair along the batch, broadcasting per-call singletons."""
    if positive is None or not isinstance(positive, torch.Tensor):
        return positive
    pair = [c.expand(batch, *c.shape[1:]) if c.shape[0] == 1 and batch > 1 else c for c in (positive, negative)]
    return torch.cat(pair)


def _default_progress(iterable):
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=None)
