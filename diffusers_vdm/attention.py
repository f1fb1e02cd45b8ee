"""Attention blocks of the multi-frame (video) UNet.

Spatial transformers attend within each frame (self-attention, then cross-attention to the text
prompt and to the per-frame image tokens of the Resampler); temporal transformers attend along the
time axis at every pixel. Module and parameter names follow the original checkpoint exactly.

All attention goes through :func:`attention`, which uses PyTorch's
``scaled_dot_product_attention`` (flash / memory-efficient kernels where available) and xformers
only when a module's ``attention_backend`` is set to ``"xformers"`` and xformers is installed.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import fused_kernels
from .normalization import ClipGroupNorm, GroupNorm

ContextType = Union[None, torch.Tensor, Sequence[torch.Tensor]]

ATTENTION_BACKENDS = ("sdpa", "xformers")
TEMPORAL_WINDOW_TYPES = ("prv", "first", "roll")


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    mask: Optional[torch.Tensor] = None,
    backend: str = "sdpa",
) -> torch.Tensor:
    """Multi-head attention on ``(batch, tokens, heads * dim_head)`` tensors, scale ``dim_head**-0.5``.

    ``k``/``v`` may have a batch of 1 (or any divisor-free broadcastable batch) when every query
    batch attends to the same keys; SDPA then broadcasts instead of copying.
    """
    if backend == "xformers":
        try:
            import xformers.ops as xops
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise RuntimeError("Attention backend 'xformers' was requested but xformers is not installed.") from exc
        b, n, c = q.shape
        d = c // heads
        kb = k.expand(b, -1, -1) if k.shape[0] != b else k
        vb = v.expand(b, -1, -1) if v.shape[0] != b else v
        bias = None
        if mask is not None:
            bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
            bias = bias.expand(b, heads, n, kb.shape[1])
        out = xops.memory_efficient_attention(
            q.view(b, n, heads, d), kb.reshape(b, -1, heads, d), vb.reshape(b, -1, heads, d), attn_bias=bias
        )
        return out.reshape(b, n, c)
    out = F.scaled_dot_product_attention(
        _split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads), attn_mask=mask
    )
    return _merge_heads(out)


def make_temporal_window(x: torch.Tensor, num_frames: int, method: str) -> torch.Tensor:
    """Widen each frame's keys/values with tokens of neighbouring frames.

    ``x`` is ``((b t), tokens, c)``. ``prv``: append the previous frame (frame 0 repeats itself);
    ``first``: append frame 0; ``roll``: previous, current, next (cyclic) concatenated.
    """
    if method not in TEMPORAL_WINDOW_TYPES:
        raise ValueError(f"temporal_window_type must be one of {TEMPORAL_WINDOW_TYPES}, got '{method}'.")
    bt, n, c = x.shape
    frames = x.view(bt // num_frames, num_frames, n, c)
    if method == "roll":
        parts = [torch.roll(frames, 1, dims=1), frames, torch.roll(frames, -1, dims=1)]
    elif method == "prv":
        parts = [frames, torch.cat([frames[:, :1], frames[:, :-1]], dim=1)]
    else:
        parts = [frames, frames[:, :1].expand_as(frames)]
    return torch.cat(parts, dim=2).reshape(bt, len(parts) * n, c)


class RelativePosition(nn.Module):
    """Learned relative-position table; present in some checkpoints, unused by the attention math."""

    def __init__(self, num_units: int, max_relative_position: int):
        super().__init__()
        self.num_units = num_units
        self.max_relative_position = max_relative_position
        self.embeddings_table = nn.Parameter(torch.empty(max_relative_position * 2 + 1, num_units))
        nn.init.xavier_uniform_(self.embeddings_table)


class CrossAttention(nn.Module):
    """Attention over spatial tokens, over time, or to (text, image) context.

    * temporal (``temporal_length`` given): self-attention along the frame axis;
    * spatial self-attention (context ``None``): optionally widened over a temporal window;
    * spatial cross-attention: ``context`` is ``(text, image)`` when ``image_cross_attention``;
      the image branch is added as ``attn(img) * scale * (tanh(alpha) + 1)`` when learnable.
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: Optional[int] = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        relative_position: bool = False,
        temporal_length: Optional[int] = None,
        video_length: Optional[int] = None,
        image_cross_attention: bool = False,
        image_cross_attention_scale: float = 1.0,
        image_cross_attention_scale_learnable: bool = False,
        text_context_len: int = 77,
        temporal_window_for_spatial_self_attention: bool = False,
        causal: bool = False,
    ):
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.dim_head = dim_head
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

        self.is_temporal_attention = temporal_length is not None
        self.relative_position = relative_position
        if relative_position:
            if not self.is_temporal_attention:
                raise ValueError("relative_position requires temporal attention (temporal_length).")
            self.relative_position_k = RelativePosition(dim_head, temporal_length)
            self.relative_position_v = RelativePosition(dim_head, temporal_length)

        # Switched at run time (see UNet3DModel.set_temporal_window); no parameters involved.
        self.video_length = video_length
        self.temporal_window_for_spatial_self_attention = temporal_window_for_spatial_self_attention
        self.temporal_window_type = "prv"

        self.image_cross_attention = image_cross_attention
        self.image_cross_attention_scale = image_cross_attention_scale
        self.image_cross_attention_scale_learnable = image_cross_attention_scale_learnable
        self.text_context_len = text_context_len
        if image_cross_attention:
            self.to_k_ip = nn.Linear(context_dim, inner_dim, bias=False)
            self.to_v_ip = nn.Linear(context_dim, inner_dim, bias=False)
            if image_cross_attention_scale_learnable:
                self.alpha = nn.Parameter(torch.tensor(0.0))

        self.causal = causal  # lower-triangular mask over frames (temporal attention only)
        self.attention_backend = "sdpa"
        #: Attend this many batch entries at a time (0 = all). Exact; caps the memory of attention
        #: kernels that materialise the score matrix (no flash attention on the device).
        self.batch_chunk = 0

    def forward(self, x: torch.Tensor, context: ContextType = None, num_frames: Optional[int] = None) -> torch.Tensor:
        if self.is_temporal_attention:
            return self._temporal_forward(x, context)
        return self._spatial_forward(x, context, num_frames)

    def _attend(self, q, k, v, mask=None):
        chunk = self.batch_chunk
        if chunk and q.shape[0] > chunk and k.shape[0] == q.shape[0]:
            return torch.cat([
                attention(q[i:i + chunk], k[i:i + chunk], v[i:i + chunk], self.heads, mask=mask,
                          backend=self.attention_backend)
                for i in range(0, q.shape[0], chunk)
            ])
        return attention(q, k, v, self.heads, mask=mask, backend=self.attention_backend)

    def _temporal_forward(self, x: torch.Tensor, context: ContextType) -> torch.Tensor:
        if context is not None:
            raise ValueError("Temporal attention only supports self-attention.")
        mask = None
        if self.causal:
            t = x.shape[1]
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        out = self._attend(self.to_q(x), self.to_k(x), self.to_v(x), mask=mask)
        return self.to_out(out)

    def _spatial_forward(self, x: torch.Tensor, context: ContextType, num_frames: Optional[int]) -> torch.Tensor:
        q = self.to_q(x)
        if context is None:
            k, v = self.to_k(x), self.to_v(x)
            if self.temporal_window_for_spatial_self_attention:
                t = self.video_length
                k = make_temporal_window(k, t, self.temporal_window_type)
                v = make_temporal_window(v, t, self.temporal_window_type)
            return self.to_out(self._attend(q, k, v))

        if isinstance(context, torch.Tensor):
            text, image = context, None
        else:
            text, image = context
        if image is not None and not self.image_cross_attention:
            raise ValueError("Image context was given to an attention layer without image cross-attention.")
        if image is None and self.image_cross_attention:
            raise ValueError("This attention layer needs (text, image) context.")

        out = self._attend_shared_context(q, text, num_frames)
        if image is not None:
            out_ip = self._attend(q, self.to_k_ip(image), self.to_v_ip(image))
            scale = self.image_cross_attention_scale
            if self.image_cross_attention_scale_learnable:
                out = out + scale * out_ip * (torch.tanh(self.alpha) + 1)
            else:
                out = out + scale * out_ip
        return self.to_out(out)

    def _attend_shared_context(self, q: torch.Tensor, text: torch.Tensor, num_frames: Optional[int]) -> torch.Tensor:
        """Cross-attention to text tokens shared by all frames of a clip.

        ``text`` is either per frame ``((b t), L, c)`` or per clip ``(b, L, c)``. Per clip, keys and
        values are projected once and every frame's queries attend to them: folding the frames
        into the query axis is the same math as repeating the text per frame, without the copies.
        """
        bt, n, c = q.shape
        if text.shape[0] == bt or num_frames is None:
            return self._attend(q, self.to_k(text), self.to_v(text))
        b = text.shape[0]
        t = bt // b
        out = self._attend(q.reshape(b, t * n, c), self.to_k(text), self.to_v(text))
        return out.reshape(bt, n, -1)


class GEGLU(nn.Module):
    """Gated GELU projection: ``x * gelu(gate)`` from one Linear.

    On CUDA (``split``, default on) the two halves of the projection are two matrix products into
    separate, contiguous tensors (the same dot products), so that the GELU and the product run as
    vectorised kernels rather than over the strided halves of one tensor: 3 % of a video-UNet step
    on an H100. Elsewhere, and with ``split = False``, it is the original's single product.

    ``fused`` (``UNet3DModel.set_fused_kernels``) computes ``value * gelu(gate)`` of the two products
    in one Triton kernel where it can run (``fused_kernels.gelu_gate``).
    """

    split: bool = True
    fused: bool = False

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wants_grad = torch.is_grad_enabled() and (x.requires_grad or self.proj.weight.requires_grad)
        fused = self.fused and not wants_grad and fused_kernels.usable(x)
        if fused or (self.split and x.is_cuda):
            return self.split_forward(x, fused=fused)
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)

    def split_forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        inner = self.proj.out_features // 2
        weight, bias = self.proj.weight, self.proj.bias
        value = F.linear(x, weight[:inner], None if bias is None else bias[:inner])
        gate = F.linear(x, weight[inner:], None if bias is None else bias[inner:])
        return fused_kernels.gelu_gate(value, gate) if fused else value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, dim_out: Optional[int] = None, mult: int = 4, glu: bool = False, dropout: float = 0.0):
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = dim if dim_out is None else dim_out
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention, gated feed-forward."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: Optional[int] = None,
        gated_ff: bool = True,
        disable_self_attn: bool = False,
        temporal_length: Optional[int] = None,
        relative_position: bool = False,
        causal: bool = False,
        video_length: Optional[int] = None,
        image_cross_attention: bool = False,
        image_cross_attention_scale: float = 1.0,
        image_cross_attention_scale_learnable: bool = False,
        text_context_len: int = 77,
    ):
        super().__init__()
        common = dict(
            heads=n_heads,
            dim_head=d_head,
            dropout=dropout,
            temporal_length=temporal_length,
            relative_position=relative_position,
            causal=causal,
            video_length=video_length,
        )
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(dim, context_dim=context_dim if disable_self_attn else None, **common)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(
            dim,
            context_dim=context_dim,
            image_cross_attention=image_cross_attention,
            image_cross_attention_scale=image_cross_attention_scale,
            image_cross_attention_scale_learnable=image_cross_attention_scale_learnable,
            text_context_len=text_context_len,
            **common,
        )
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: ContextType = None, num_frames: Optional[int] = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x), context=context if self.disable_self_attn else None, num_frames=num_frames) + x
        x = self.attn2(self.norm2(x), context=context, num_frames=num_frames) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of each frame; input and output ``((b t), c, h, w)``."""

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: Optional[int] = None,
        disable_self_attn: bool = False,
        use_linear: bool = False,
        video_length: Optional[int] = None,
        image_cross_attention: bool = False,
        image_cross_attention_scale_learnable: bool = False,
    ):
        super().__init__()
        self.in_channels = in_channels
        inner_dim = n_heads * d_head
        self.use_linear = use_linear
        self.norm = GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner_dim)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            [
                BasicTransformerBlock(
                    inner_dim,
                    n_heads,
                    d_head,
                    dropout=dropout,
                    context_dim=context_dim,
                    disable_self_attn=disable_self_attn,
                    video_length=video_length,
                    image_cross_attention=image_cross_attention,
                    image_cross_attention_scale_learnable=image_cross_attention_scale_learnable,
                )
                for _ in range(depth)
            ]
        )
        if use_linear:
            self.proj_out = nn.Linear(inner_dim, in_channels)
        else:
            self.proj_out = nn.Conv2d(inner_dim, in_channels, kernel_size=1)

    def forward(self, x: torch.Tensor, context: ContextType = None, num_frames: Optional[int] = None) -> torch.Tensor:
        bt, c, h, w = x.shape
        residual = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)  # (bt, hw, c)
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context=context, num_frames=num_frames)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(bt, -1, h, w)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + residual


class TemporalTransformer(nn.Module):
    """Transformer along the frame axis at every pixel; input and output ``(b, c, t, h, w)``.

    The group norm runs over the whole clip (all frames together), as in the original.
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: Optional[int] = None,
        use_linear: bool = False,
        only_self_att: bool = True,
        causal_attention: bool = False,
        causal_block_size: int = 1,
        relative_position: bool = False,
        temporal_length: Optional[int] = None,
    ):
        super().__init__()
        if not only_self_att:
            raise ValueError("Temporal cross-attention is not supported: use temporal_selfatt_only=True.")
        self.only_self_att = only_self_att
        self.channels_last = False  # set by UNet3DModel.set_channels_last
        self.relative_position = relative_position
        self.causal_attention = causal_attention
        self.causal_block_size = causal_block_size
        self.in_channels = in_channels
        self.use_linear = use_linear
        inner_dim = n_heads * d_head
        self.norm = ClipGroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner_dim)
        else:
            self.proj_in = nn.Conv1d(in_channels, inner_dim, kernel_size=1)

        if causal_attention and temporal_length is None:
            raise ValueError("causal temporal attention needs temporal_length.")
        self.transformer_blocks = nn.ModuleList(
            [
                BasicTransformerBlock(
                    inner_dim,
                    n_heads,
                    d_head,
                    dropout=dropout,
                    context_dim=None,
                    temporal_length=temporal_length,
                    relative_position=relative_position,
                    causal=causal_attention,
                )
                for _ in range(depth)
            ]
        )
        if use_linear:
            self.proj_out = nn.Linear(inner_dim, in_channels)
        else:
            self.proj_out = nn.Conv1d(inner_dim, in_channels, kernel_size=1)

    def _project(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # A 1x1 Conv1d over channels is a Linear over the last axis of (..., c).
        if isinstance(layer, nn.Conv1d):
            return F.linear(x, layer.weight.squeeze(-1), layer.bias)
        return layer(x)

    def forward(self, x: torch.Tensor, context: ContextType = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        residual = x
        if self.channels_last:
            # The norm writes the (b, h, w, t, c) token layout directly: no copy to get there.
            tokens = torch.empty((b, h, w, t, c), dtype=x.dtype, device=x.device)
            self.norm(x, out=tokens.permute(0, 4, 3, 1, 2))
            x = tokens.view(b * h * w, t, c)
        else:
            x = self.norm(x)
            x = x.permute(0, 3, 4, 2, 1).reshape(b * h * w, t, c)
        x = self._project(self.proj_in, x)
        for block in self.transformer_blocks:
            x = block(x)
        x = self._project(self.proj_out, x)
        x = x.reshape(b, h, w, t, c).permute(0, 4, 3, 1, 2)
        # A sum takes the layout of its first operand: the residual's keeps channels-last clips so.
        return residual + x if self.channels_last else x + residual
