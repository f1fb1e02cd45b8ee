"""Sinusoidal embeddings shared by the video UNet's time and frame-stride conditioning."""

from __future__ import annotations

import functools
import math

import torch


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """``[N] -> [N, dim]`` sinusoidal embedding, cosines first (the lvdm/guided-diffusion order).

    Timesteps may be fractional; frequencies are computed in float32 regardless of the input so
    that fp16 models see the same embedding as fp32 ones (the caller casts the result).
    """
    half = dim // 2
    if torch.compiler.is_compiling():  # traced into the graph once; no cache needed
        freqs = _frequencies.__wrapped__(half, max_period, timesteps.device)
    else:
        freqs = _frequencies(half, max_period, timesteps.device)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


@functools.lru_cache(maxsize=16)
def _frequencies(half: int, max_period: int, device: torch.device) -> torch.Tensor:
    """The embedding's frequencies, computed on the CPU (bit-identical to the original) and kept on
    ``device``: a per-call host-to-device copy would stall the GPU queue on every UNet step and
    cannot be captured in a CUDA graph. Read-only."""
    return torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(device)
