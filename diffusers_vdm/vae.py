"""The ToonCrafter video VAE: a per-frame image encoder and a temporally mixed, reference-guided decoder.

The encoder is the classic LDM image encoder; besides the latent it can return its per-level
features, whose first and last frames guide the decoder (``ref_context``) so that the decoded
in-between frames keep the keyframes' detail. Parameter names match the official checkpoint.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .modeling import DeviceDtypeMixin
from .normalization import GroupMoments, group_moments, merge_group_moments, normalize_with_moments
from .unet import Upsample, conv_nd, normalization


def nonlinearity(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x)


def group_norm(channels: int, num_groups: int = 32) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=num_groups, num_channels=channels, eps=1e-6, affine=True)


def per_frame(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int = 0) -> torch.Tensor:
    """``fn`` over the frames of ``x`` ``((b t), ...)``, ``chunk`` frames at a time (0 = all at once).

    Only for functions that treat frames independently (2D convs, per-image norms and attention):
    the result is exactly ``fn(x)``, but the peak memory of ``fn``'s temporaries shrinks with the
    chunk. Chunks are written into one preallocated output, so nothing is concatenated.
    """
    n = x.shape[0]
    if not chunk or n <= chunk:
        return fn(x)
    first = fn(x[:chunk])
    out = first.new_empty((n,) + tuple(first.shape[1:]))
    out[:chunk] = first
    del first
    for start in range(chunk, n, chunk):
        out[start:start + chunk] = fn(x[start:start + chunk])
    return out


def row_bands(rows: int, row_bytes: int, budget_bytes: int) -> list[tuple[int, int]]:
    """Split ``rows`` into consecutive bands of at most ``budget_bytes`` (and at least one row) each."""
    per_band = max(1, budget_bytes // max(1, row_bytes))
    return [(start, min(start + per_band, rows)) for start in range(0, rows, per_band)]


class DiagonalGaussianDistribution:
    """Posterior ``N(mean, exp(logvar))`` from the encoder moments; logvar clamped to [-30, 20]."""

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.mean, self.logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(self.logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if deterministic:
            self.var = self.std = torch.zeros_like(self.mean)

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype, device=self.mean.device)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean


class EncoderDownSampleBlock(nn.Module):
    """Stride-2 downsampling with asymmetric (right/bottom) zero padding, as in LDM."""

    def __init__(self, in_channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResnetBlock(nn.Module):
    def __init__(self, *, in_channels: int, out_channels: Optional[int] = None, conv_shortcut: bool = False,
                 dropout: float, temb_channels: int = 512):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.use_conv_shortcut = conv_shortcut
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if temb_channels > 0:
            self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        # SiLU in place on the norms' fresh outputs: same values, one activation-sized buffer less.
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        if temb is not None:
            h = h + self.temb_proj(nonlinearity(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=True)))
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
        return h.add_(x)


class Attention(nn.Module):
    """Single-head self-attention over the pixels of each image, with 1x1-conv projections."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.norm = group_norm(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        b, c, h, w = x.shape
        h_ = self.norm(x)
        q, k, v = (conv(h_).flatten(2).transpose(1, 2).unsqueeze(1) for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # one head of width c
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class ConvCombiner(nn.Module):
    """Adds a 1x1-conv of the reference features to the first and last frame of each clip."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 1, padding=0)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``x``: ``((b t), c, h, w)``; ``context``: ``(b, c, 2, h, w)`` (first and last frame).

        Adds in place (as the original did through a rearranged view): ``x`` is the decoder's own
        activation, and a copy would cost a full frame stack at the highest resolution.
        """
        b, c, l, h, w = context.shape
        ctx = self.conv(context.transpose(1, 2).reshape(b * l, c, h, w)).reshape(b, l, c, h, w)
        x = x if x.is_contiguous() else x.contiguous()
        frames = x.view(b, x.shape[0] // b, c, h, w)
        frames[:, 0] += ctx[:, 0]
        frames[:, -1] += ctx[:, -1]
        return x


class AttentionCombiner(nn.Module):
    """Every frame attends to the reference features of the clip's first and last frame.

    Keys/values are computed once per clip; folding the frames into the query axis gives the same
    result as repeating them per frame (the original), without materialising the copies, and SDPA
    keeps the (queries x keys) matrix out of memory.
    """

    def __init__(self, query_dim: int, context_dim: Optional[int] = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0, **kwargs):
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.dim_head = dim_head
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))
        self.norm = group_norm(query_dim)
        nn.init.zeros_(self.to_out[0].weight)
        nn.init.zeros_(self.to_out[0].bias)
        #: Frames per attention call; 0 = all frames at once. Lower it to cap peak memory.
        self.frame_chunk = 0

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if mask is not None:
            raise NotImplementedError("AttentionCombiner does not support masks.")
        bt, c, h, w = x.shape
        b, cc, l, hc, wc = context.shape
        t = bt // b
        ctx = context.permute(0, 2, 3, 4, 1).reshape(b, l * hc * wc, cc)
        k = self._heads(self.to_k(ctx))
        v = self._heads(self.to_v(ctx))
        h_ = self.norm(x).flatten(2).transpose(1, 2)  # (bt, hw, c)
        chunk = self.frame_chunk or t
        outs = []
        for start in range(0, t, chunk):
            q = h_.reshape(b, t, h * w, c)[:, start:start + chunk].reshape(b, -1, c)
            q = self._heads(self.to_q(q))
            o = F.scaled_dot_product_attention(q, k, v)
            o = o.transpose(1, 2).reshape(b, -1, self.heads * self.dim_head)
            outs.append(self.to_out(o).reshape(b, -1, h * w, c))
        out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
        out = out.reshape(bt, h * w, c).transpose(1, 2).reshape(bt, c, h, w)
        return x + out

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.dim_head).transpose(1, 2)


class Encoder(nn.Module):
    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int,
                 attn_resolutions: Sequence[int], dropout: float = 0.0, resamp_with_conv: bool = True,
                 in_channels: int, resolution: int, z_channels: int, double_z: bool = True, **ignored):
        super().__init__()
        self.ch = ch
        self.temb_ch = 0
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)

        curr_res = resolution
        in_ch_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for i_level in range(self.num_resolutions):
            block = nn.ModuleList()
            attn = nn.ModuleList()
            block_in = ch * in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(in_channels=block_in, out_channels=block_out, temb_channels=0, dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(Attention(block_in))
            down = nn.Module()
            down.block = block
            down.attn = attn
            if i_level != self.num_resolutions - 1:
                down.downsample = EncoderDownSampleBlock(block_in, resamp_with_conv)
                curr_res //= 2
            self.down.append(down)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, temb_channels=0, dropout=dropout)
        self.mid.attn_1 = Attention(block_in)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, temb_channels=0, dropout=dropout)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor, return_hidden_states: bool = False):
        """Returns the moments, and with ``return_hidden_states`` the per-level features + conv_in output (last)."""
        first = self.conv_in(x)
        h = first
        hidden_states = []
        for i_level, down in enumerate(self.down):
            for i_block, block in enumerate(down.block):
                h = block(h)
                if len(down.attn) > 0:
                    h = down.attn[i_block](h)
            if return_hidden_states:
                hidden_states.append(h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)
        if return_hidden_states:
            hidden_states.append(first)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        h = self.conv_out(nonlinearity(self.norm_out(h)))
        if return_hidden_states:
            return h, hidden_states
        return h


class TimeStackBlock(nn.Module):
    """Residual 3D-conv block over ``(b, c, t, h, w)`` without time embedding (the decoder's temporal mixer)."""

    def __init__(self, channels: int, dropout: float, out_channels: Optional[int] = None,
                 kernel_size: Sequence[int] | int = (3, 1, 1), dims: int = 3):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        padding = [k // 2 for k in kernel_size] if isinstance(kernel_size, (list, tuple)) else kernel_size // 2
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), conv_nd(dims, channels, self.out_channels, kernel_size, padding=padding)
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            conv_nd(dims, self.out_channels, self.out_channels, kernel_size, padding=padding),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The same layers as in_layers / out_layers, with SiLU in place on the norms' fresh outputs.
        h = self.in_layers[2](F.silu(self.in_layers[0](x), inplace=True))
        h = self.out_layers[3](self.out_layers[2](F.silu(self.out_layers[0](h), inplace=True)))
        return h.add_(self.skip_connection(x))

    def mixes_only_time(self) -> bool:
        """True when every convolution has a ``(k, 1, 1)`` kernel: each pixel's output then depends
        only on that pixel's values over time (and on the clip-wide norm statistics)."""
        convs = [self.in_layers[2], self.out_layers[3]]
        if not isinstance(self.skip_connection, nn.Identity):
            convs.append(self.skip_connection)
        return all(
            isinstance(conv, nn.Conv3d) and conv.kernel_size[1:] == (1, 1) and conv.stride == (1, 1, 1)
            and tuple(conv.padding[1:]) == (0, 0) and conv.groups == 1
            for conv in convs
        )

    def blend_in_bands(self, x5: torch.Tensor, alpha: torch.Tensor, band_bytes: int) -> None:
        """Overwrite ``x5`` ``(b, c, t, h, w)`` with ``alpha * self(x5) + (1 - alpha) * x5``, band by band.

        Same math as :meth:`forward` followed by the blend, for ``mixes_only_time`` blocks, but no
        whole-clip temporary is ever allocated: the two norms' clip-wide statistics are gathered band
        by band first (the first conv is recomputed rather than stored), then each band of rows is
        normalised, mixed over time and written back in place. ``band_bytes`` bounds one band.
        """
        norm_in, conv_in = self.in_layers[0], self.in_layers[2]
        norm_out, dropout, conv_out = self.out_layers[0], self.out_layers[2], self.out_layers[3]
        row_bytes = x5[..., :1, :].numel() * x5.element_size()
        bands = [x5[..., start:stop, :] for start, stop in row_bands(x5.shape[-2], row_bytes, band_bytes)]

        def moments(parts, num_groups: int) -> GroupMoments:
            total = None
            for part in parts:
                total = merge_group_moments(total, group_moments(part, num_groups))
            return total

        moments_in = moments(bands, norm_in.num_groups)

        def first_conv(band: torch.Tensor) -> torch.Tensor:
            normed = normalize_with_moments(band, moments_in, norm_in.weight, norm_in.bias, norm_in.eps)
            return conv_in(F.silu(normed, inplace=True))

        moments_out = moments((first_conv(band) for band in bands), norm_out.num_groups)
        for band in bands:
            normed = normalize_with_moments(first_conv(band), moments_out, norm_out.weight, norm_out.bias, norm_out.eps)
            mixed = conv_out(dropout(F.silu(normed, inplace=True))).add_(self.skip_connection(band))
            band.copy_(mixed.mul_(alpha).add_((1.0 - alpha) * band))


class VideoResBlock(ResnetBlock):
    """Per-frame ResnetBlock, then a temporal block blended in with a learned ``sigmoid(mix_factor)``."""

    def __init__(self, out_channels: int, *args, dropout: float = 0.0, video_kernel_size=(3, 1, 1),
                 alpha: float = 0.0, merge_strategy: str = "learned", **kwargs):
        super().__init__(out_channels=out_channels, dropout=dropout, *args, **kwargs)
        if video_kernel_size is None:
            video_kernel_size = [3, 1, 1]
        self.time_stack = TimeStackBlock(channels=out_channels, dropout=dropout, kernel_size=video_kernel_size)
        self.merge_strategy = merge_strategy
        if merge_strategy == "fixed":
            self.register_buffer("mix_factor", torch.tensor([alpha]))
        elif merge_strategy == "learned":
            self.mix_factor = nn.Parameter(torch.tensor([alpha]))
        else:
            raise ValueError(f"unknown merge strategy {merge_strategy}")

    def get_alpha(self) -> torch.Tensor:
        return self.mix_factor if self.merge_strategy == "fixed" else torch.sigmoid(self.mix_factor)

    def forward(self, x: torch.Tensor, temb: Optional[torch.Tensor] = None, timesteps: Optional[int] = None,
                skip_video: bool = False, frame_chunk: int = 0, band_bytes: int = 0) -> torch.Tensor:
        """``x``: ``((b t), c, h, w)``; ``timesteps`` is the number of frames per clip.

        The per-frame part runs ``frame_chunk`` frames at a time (0 = all); the temporal part always
        sees the whole clip (its group norm takes statistics over all frames). With ``band_bytes``
        the temporal part works on bands of rows of at most that size, in place (see
        :meth:`TimeStackBlock.blend_in_bands`).
        """
        x = per_frame(lambda f: ResnetBlock.forward(self, f, temb), x, frame_chunk)
        if skip_video:
            return x
        bt, c, h, w = x.shape
        x5 = x.view(bt // timesteps, timesteps, c, h, w).transpose(1, 2)
        alpha = self.get_alpha()
        whole_clip_fits_one_band = x5.numel() * x5.element_size() <= band_bytes
        if band_bytes and not whole_clip_fits_one_band and self.time_stack.mixes_only_time():
            # ``x`` is this block's own fresh output, so it can take the result in place.
            self.time_stack.blend_in_bands(x5, alpha, band_bytes)
            return x
        mixed = self.time_stack(x5)
        # alpha * mixed + (1 - alpha) * x5, with the same roundings, reusing ``mixed``'s buffer.
        out = mixed.mul_(alpha).add_((1.0 - alpha) * x5)
        return out.transpose(1, 2).reshape(bt, c, h, w)


class DecoderConv3D(nn.Conv2d):
    """Per-frame output conv followed by a temporal 3D conv (``time_mix_conv``)."""

    def __init__(self, in_channels: int, out_channels: int, video_kernel_size=3, *args, **kwargs):
        super().__init__(in_channels, out_channels, *args, **kwargs)
        if isinstance(video_kernel_size, (list, tuple)):
            padding = [int(k // 2) for k in video_kernel_size]
        else:
            padding = int(video_kernel_size // 2)
        self.time_mix_conv = nn.Conv3d(out_channels, out_channels, kernel_size=video_kernel_size, padding=padding)

    def forward(self, input: torch.Tensor, timesteps: Optional[int] = None, skip_video: bool = False,
                frame_chunk: int = 0) -> torch.Tensor:
        x = per_frame(super().forward, input, frame_chunk)
        if skip_video:
            return x
        bt, c, h, w = x.shape
        x5 = x.view(bt // timesteps, timesteps, c, h, w).transpose(1, 2)
        return self.time_mix_conv(x5).transpose(1, 2).reshape(bt, c, h, w)


class VideoDecoder(nn.Module):
    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int,
                 attn_resolutions: Sequence[int], dropout: float = 0.0, resamp_with_conv: bool = True,
                 in_channels: int, resolution: int, z_channels: int, give_pre_end: bool = False,
                 tanh_out: bool = False, attn_level: Sequence[int] = (2, 3), video_kernel_size=(3, 1, 1),
                 alpha: float = 0.0, merge_strategy: str = "learned", **ignored):
        super().__init__()
        self.ch = ch
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        #: Frames per call of the per-frame layers (0 = all); exact, lowers the decoder's peak memory.
        self.frame_chunk = 0
        #: Largest band of rows (bytes) for the temporal mixing of the video blocks (0 = whole clips).
        self.band_bytes = 0
        self.give_pre_end = give_pre_end
        self.tanh_out = tanh_out
        self.attn_level = list(attn_level)
        video_kernel_size = list(video_kernel_size)

        def video_block(cin: int, cout: int) -> VideoResBlock:
            return VideoResBlock(in_channels=cin, out_channels=cout, temb_channels=0, dropout=dropout,
                                 video_kernel_size=video_kernel_size, alpha=alpha, merge_strategy=merge_strategy)

        block_in = ch * ch_mult[self.num_resolutions - 1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.z_shape = (1, z_channels, curr_res, curr_res)
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)

        self.mid = nn.Module()
        self.mid.block_1 = video_block(block_in, block_in)
        self.mid.attn_1 = Attention(block_in)
        self.mid.block_2 = video_block(block_in, block_in)

        self.up = nn.ModuleList()
        self.attn_refinement = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block = nn.ModuleList()
            attn = nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                block.append(video_block(block_in, block_out))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(Attention(block_in))
            up = nn.Module()
            up.block = block
            up.attn = attn
            if i_level != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
                curr_res *= 2
            self.up.insert(0, up)
            combiner = AttentionCombiner(block_in) if i_level in self.attn_level else ConvCombiner(block_in)
            self.attn_refinement.insert(0, combiner)
        self.norm_out = group_norm(block_in)
        self.attn_refinement.append(ConvCombiner(block_in))
        self.conv_out = DecoderConv3D(block_in, out_ch, kernel_size=3, stride=1, padding=1,
                                      video_kernel_size=video_kernel_size)

    def forward(self, z: torch.Tensor, ref_context: Optional[Sequence[torch.Tensor]] = None,
                timesteps: Optional[int] = None) -> torch.Tensor:
        """``z``: ``((b t), z, h, w)``; ``ref_context``: encoder features (first & last frame) per level."""
        if timesteps is None:
            timesteps = z.shape[0]
        chunk = self.frame_chunk
        h = self.conv_in(z)
        h = self.mid.block_1(h, timesteps=timesteps, frame_chunk=chunk, band_bytes=self.band_bytes)
        h = per_frame(self.mid.attn_1, h, chunk)
        h = self.mid.block_2(h, timesteps=timesteps, frame_chunk=chunk, band_bytes=self.band_bytes)
        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for i_block, block in enumerate(up.block):
                h = block(h, timesteps=timesteps, frame_chunk=chunk, band_bytes=self.band_bytes)
                if len(up.attn) > 0:
                    h = per_frame(up.attn[i_block], h, chunk)
            if ref_context:
                h = self.attn_refinement[i_level](h, ref_context[i_level])
            if i_level != 0:
                h = per_frame(up.upsample, h, chunk)
        if self.give_pre_end:
            return h
        h = per_frame(lambda f: F.silu(self.norm_out(f), inplace=True), h, chunk)
        if ref_context:
            h = self.attn_refinement[-1](h, ref_context[-1])
        h = self.conv_out(h, timesteps=timesteps, frame_chunk=chunk)
        return torch.tanh(h) if self.tanh_out else h


class VideoAutoencoderKL(DeviceDtypeMixin, nn.Module):
    """Video VAE. Constructor kwargs are exactly the keys of the official ``vae/config.json``."""

    #: Latent scaling of the ToonCrafter VAE (fixed, not part of the config).
    scale_factor = 0.18215

    def __init__(self, double_z: bool = True, z_channels: int = 4, resolution: int = 256, in_channels: int = 3,
                 out_ch: int = 3, ch: int = 128, ch_mult: Sequence[int] = (), num_res_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (), dropout: float = 0.0):
        super().__init__()
        self.config = dict(double_z=double_z, z_channels=z_channels, resolution=resolution, in_channels=in_channels,
                           out_ch=out_ch, ch=ch, ch_mult=list(ch_mult), num_res_blocks=num_res_blocks,
                           attn_resolutions=list(attn_resolutions), dropout=dropout)
        common = dict(double_z=double_z, z_channels=z_channels, resolution=resolution, in_channels=in_channels,
                      out_ch=out_ch, ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                      attn_resolutions=attn_resolutions, dropout=dropout)
        self.encoder = Encoder(**common)
        self.decoder = VideoDecoder(**common)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * z_channels, 1)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 1)

    def encode(self, x: torch.Tensor, return_hidden_states: bool = False, **kwargs):
        """``x``: images ``(n, 3, h, w)`` in [-1, 1]. Returns ``(posterior, hidden_states or None)``."""
        if return_hidden_states:
            h, hidden = self.encoder(x, return_hidden_states=True)
            return DiagonalGaussianDistribution(self.quant_conv(h)), hidden
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x))), None

    def decode(self, z: torch.Tensor, ref_context: Optional[Sequence[torch.Tensor]] = None,
               timesteps: Optional[int] = None) -> torch.Tensor:
        """``z``: ``((b t), z, h, w)`` unscaled latents -> frames in about [-1, 1].

        As in the original, ``post_quant_conv`` is applied only when neither ``ref_context`` nor
        ``timesteps`` is given (the pipeline always gives both, so it never runs there).
        """
        if ref_context is None and timesteps is None:
            z = self.post_quant_conv(z)
        return self.decoder(z, ref_context=ref_context, timesteps=timesteps)

    def set_decoder_frame_chunk(self, frames: int) -> None:
        """Decode ``frames`` frames at a time wherever the decoder works per frame (0 = all at once).

        Exact: the temporal layers still see the whole clip. Lowers the decoder's peak memory, which
        at 448x384 and 16 frames is the largest of the whole job.
        """
        self.decoder.frame_chunk = int(frames)
        for m in self.decoder.modules():
            if isinstance(m, AttentionCombiner):
                m.frame_chunk = int(frames)

    def set_decoder_band_bytes(self, band_bytes: int) -> None:
        """Run the decoder's temporal mixing on bands of rows of at most ``band_bytes`` (0 = whole clips).

        Same math (clip-wide norm statistics are gathered band by band); no temporary of the size of
        a whole clip at full resolution, where the decoder otherwise holds several at once.
        """
        self.decoder.band_bytes = int(band_bytes)
