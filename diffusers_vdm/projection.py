"""Resampler: turns CLIP-vision tokens of the two keyframes into per-frame image context tokens.

A Perceiver-style stack (IP-Adapter / Flamingo lineage): learned latent queries, one per
(frame, query) pair, cross-attend to the image tokens plus themselves. Parameter names match the
official checkpoint.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .modeling import DeviceDtypeMixin


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    inner_dim = int(dim * mult)
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, inner_dim, bias=False),
        nn.GELU(),
        nn.Linear(inner_dim, dim, bias=False),
    )


class PerceiverAttention(nn.Module):
    """Latents attend to ``cat(image tokens, latents)``."""

    def __init__(self, *, dim: int, dim_head: int = 64, heads: int = 8):
        super().__init__()
        self.dim_head = dim_head
        self.heads = heads
        inner_dim = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, inner_dim * 2, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """``x``: (b, n1, dim) image features; ``latents``: (b, n2, dim)."""
        x = self.norm1(x)
        latents = self.norm2(latents)
        b, n, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
        q, k, v = (t.view(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        if q.dtype == torch.float32:
            # Same math as scaling q and k by dim_head**-0.25 each and a float32 softmax.
            out = F.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(self.dim_head))
        else:
            # Half precision: keep the original's overflow-safe order (scale before the product,
            # softmax in float32), which flash kernels would also give but not all backends do.
            s = 1.0 / math.sqrt(math.sqrt(self.dim_head))
            weight = (q * s) @ (k * s).transpose(-2, -1)
            out = torch.softmax(weight.float(), dim=-1).type(weight.dtype) @ v
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class Resampler(DeviceDtypeMixin, nn.Module):
    """``(b, input_frames_length, tokens, embedding_dim) -> (b, video_length, num_queries, output_dim)``.

    Constructor kwargs are exactly the keys of the official ``image_projection/config.json``.
    """

    def __init__(
        self,
        dim: int = 1024,
        depth: int = 8,
        dim_head: int = 64,
        heads: int = 16,
        num_queries: int = 8,
        embedding_dim: int = 768,
        output_dim: int = 1024,
        ff_mult: int = 4,
        video_length: int = 16,
        input_frames_length: int = 2,
    ):
        super().__init__()
        self.config = dict(dim=dim, depth=depth, dim_head=dim_head, heads=heads, num_queries=num_queries,
                           embedding_dim=embedding_dim, output_dim=output_dim, ff_mult=ff_mult,
                           video_length=video_length, input_frames_length=input_frames_length)
        self.num_queries = num_queries
        self.video_length = video_length
        self.latents = nn.Parameter(torch.randn(1, num_queries * video_length, dim) / dim**0.5)
        self.input_pos = nn.Parameter(torch.zeros(1, input_frames_length, 1, embedding_dim))
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            [
                nn.ModuleList([PerceiverAttention(dim=dim, dim_head=dim_head, heads=heads), feed_forward(dim, ff_mult)])
                for _ in range(depth)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        latents = self.latents.expand(b, -1, -1)
        x = x + self.input_pos
        x = self.proj_in(x.reshape(b, -1, x.shape[-1]))
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        latents = self.norm_out(self.proj_out(latents))
        return latents.reshape(b, self.video_length, -1, latents.shape[-1])
