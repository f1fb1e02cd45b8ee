"""The multi-frame 3D UNet (DynamiCrafter / ToonCrafter lineage, as shipped by Paints-UNDO).

Frames are processed as a batch of images ``((b t), c, h, w)`` by 2D convolutions and spatial
transformers; temporal convolutions and temporal transformers mix information across the ``t``
frames of each clip. Parameter names match the official checkpoint, including the historical
``temopral_conv`` spelling.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .attention import (
    ATTENTION_BACKENDS, GEGLU, TEMPORAL_WINDOW_TYPES, CrossAttention, SpatialTransformer, TemporalTransformer,
)
from .embeddings import timestep_embedding
from .modeling import DeviceDtypeMixin
from .normalization import ClipGroupNorm, FusableSiLU, GroupNorm, fuse_norm_silu


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1D, 2D or 3D convolution (``dims`` comes from the config)."""
    if dims == 1:
        return nn.Conv1d(*args, **kwargs)
    if dims == 2:
        return nn.Conv2d(*args, **kwargs)
    if dims == 3:
        return nn.Conv3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims}")


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    if dims == 1:
        return nn.AvgPool1d(*args, **kwargs)
    if dims == 2:
        return nn.AvgPool2d(*args, **kwargs)
    if dims == 3:
        return nn.AvgPool3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims}")


def normalization(channels: int) -> nn.GroupNorm:
    return GroupNorm(32, channels)


class Downsample(nn.Module):
    """Stride-2 downsampling, by a 3x3 convolution (``op``) or average pooling."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: Optional[int] = None, padding: int = 1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, channels, self.out_channels, 3, stride=stride, padding=padding)
        else:
            if self.channels != self.out_channels:
                raise ValueError("Pooling downsample cannot change the channel count.")
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling, optionally followed by a 3x3 convolution (``conv``)."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: Optional[int] = None, padding: int = 1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, channels, self.out_channels, 3, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


def temporal_conv_as_2d(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for a 3x1x1 ``Conv3d`` as a 3x1 ``Conv2d`` over ``(b, c, t, h w)``, the same sums.

    Frames stay where they are in memory: a ``(b, c, t, h, w)`` clip flattens to ``(b, c, t, h w)``
    without a copy in either layout (channels-last-3d becomes channels-last), and the kernel's weight
    ``(o, i, 3, 1, 1)`` loses its last axis as a view. cuDNN's 2D kernels are its most tuned ones.
    """
    if conv.kernel_size[1:] != (1, 1) or conv.stride != (1, 1, 1) or conv.dilation != (1, 1, 1) \
            or conv.groups != 1 or conv.padding[1:] != (0, 0) or conv.padding_mode != "zeros":
        return conv(x)
    height, width = x.shape[3:]
    y = F.conv2d(x.flatten(3), conv.weight.squeeze(-1), conv.bias, padding=(conv.padding[0], 0))
    return y.unflatten(3, (height, width))


class TemporalConvBlock(nn.Module):
    """Four residual 3D convolutions over time (kernel 3x1x1, or 3x3x1 / 3x1x3 when spatial-aware).

    ``as_2d`` (``UNet3DModel.set_temporal_conv_2d``) runs the 3x1x1 convolutions as 3x1 2D ones
    (``temporal_conv_as_2d``): the same sums, through cuDNN's 2D kernels.
    """

    as_2d: bool = False

    def __init__(self, in_channels: int, out_channels: Optional[int] = None, dropout: float = 0.0, spatial_aware: bool = False):
        super().__init__()
        out_channels = out_channels or in_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        th_kernel, th_pad = ((3, 3, 1), (1, 1, 0)) if spatial_aware else ((3, 1, 1), (1, 0, 0))
        tw_kernel, tw_pad = ((3, 1, 3), (1, 0, 1)) if spatial_aware else ((3, 1, 1), (1, 0, 0))
        self.conv1 = nn.Sequential(
            ClipGroupNorm(32, in_channels), FusableSiLU(), nn.Conv3d(in_channels, out_channels, th_kernel, padding=th_pad)
        )
        self.conv2 = nn.Sequential(
            ClipGroupNorm(32, out_channels), FusableSiLU(), nn.Dropout(dropout),
            nn.Conv3d(out_channels, in_channels, tw_kernel, padding=tw_pad),
        )
        self.conv3 = nn.Sequential(
            ClipGroupNorm(32, out_channels), FusableSiLU(), nn.Dropout(dropout),
            nn.Conv3d(out_channels, in_channels, th_kernel, padding=th_pad),
        )
        self.conv4 = nn.Sequential(
            ClipGroupNorm(32, out_channels), FusableSiLU(), nn.Dropout(dropout),
            nn.Conv3d(out_channels, in_channels, tw_kernel, padding=tw_pad),
        )
        # Zero-init of the last conv makes the block start as the identity when trained from scratch.
        nn.init.zeros_(self.conv4[-1].weight)
        nn.init.zeros_(self.conv4[-1].bias)

    def fuse_norm_activations(self, enabled: bool) -> None:
        """Each group norm applies the SiLU after it (see ``GroupNorm.applies_silu``)."""
        for layers in (self.conv1, self.conv2, self.conv3, self.conv4):
            fuse_norm_silu(layers, enabled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.as_2d:
            return x + self.conv4(self.conv3(self.conv2(self.conv1(x))))
        h = x
        for layers in (self.conv1, self.conv2, self.conv3, self.conv4):
            for layer in layers:
                h = temporal_conv_as_2d(layer, h) if isinstance(layer, nn.Conv3d) else layer(h)
        return x + h


class ResBlock(nn.Module):
    """Residual block conditioned on the time embedding, followed by an optional temporal conv block."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: Optional[int] = None,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        use_conv: bool = False,
        up: bool = False,
        down: bool = False,
        use_temporal_conv: bool = False,
        tempspatial_aware: bool = False,
    ):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_temporal_conv = use_temporal_conv

        self.in_layers = nn.Sequential(
            normalization(channels), FusableSiLU(), conv_nd(dims, channels, self.out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False, dims), Upsample(channels, False, dims)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False, dims), Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels)
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            FusableSiLU(),
            nn.Dropout(p=dropout),
            nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)
        if use_temporal_conv:
            self.temopral_conv = TemporalConvBlock(
                self.out_channels, self.out_channels, dropout=0.1, spatial_aware=tempspatial_aware
            )

    def fuse_norm_activations(self, enabled: bool) -> None:
        """Each group norm applies the SiLU after it, except where a scale and shift come between."""
        fuse_norm_silu(self.in_layers, enabled)
        if not self.use_scale_shift_norm:
            fuse_norm_silu(self.out_layers, enabled)
        if self.use_temporal_conv:
            self.temopral_conv.fuse_norm_activations(enabled)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, num_frames: Optional[int] = None) -> torch.Tensor:
        """``x``: ``((b t), c, h, w)``; ``emb``: ``((b t), emb_channels)``."""
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.h_upd(h)
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            # ``norm(h + emb_out)``: the fused norm folds the sum into its statistics (no pass of its own).
            h = self.out_layers[1:](self.out_layers[0](h, offset=emb_out))
        h = self.skip_connection(x) + h
        if self.use_temporal_conv and num_frames:
            bt, c, hh, ww = h.shape
            h5 = h.view(bt // num_frames, num_frames, c, hh, ww).transpose(1, 2)
            h5 = self.temopral_conv(h5)
            h = h5.transpose(1, 2).reshape(bt, c, hh, ww)
        return h


class TimestepEmbedSequential(nn.Sequential):
    """Runs its layers, giving each the inputs it needs (embedding, context, frame count)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context=None, num_frames: Optional[int] = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb, num_frames=num_frames)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, num_frames=num_frames)
            elif isinstance(layer, TemporalTransformer):
                bt, c, h, w = x.shape
                x5 = x.view(bt // num_frames, num_frames, c, h, w).transpose(1, 2)
                x = layer(x5).transpose(1, 2).reshape(bt, c, h, w)
            else:
                x = layer(x)
        return x


class UNet3DModel(DeviceDtypeMixin, nn.Module):
    """Video UNet. ``forward(x (b,c,t,h,w), timesteps (b,), context_text, context_img, concat_cond, fs)``.

    Constructor kwargs are exactly the keys of the official ``unet/config.json``.
    """

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        context_dim: Optional[int] = None,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        transformer_depth: int = 1,
        use_linear: bool = False,
        temporal_conv: bool = False,
        tempspatial_aware: bool = False,
        temporal_attention: bool = True,
        use_relative_position: bool = True,
        use_causal_attention: bool = False,
        temporal_length: Optional[int] = None,
        addition_attention: bool = False,
        temporal_selfatt_only: bool = True,
        image_cross_attention: bool = False,
        image_cross_attention_scale_learnable: bool = False,
        default_fs: int = 4,
        fs_condition: bool = False,
    ):
        super().__init__()
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("Either num_heads or num_head_channels has to be set.")
        self.config = dict(
            in_channels=in_channels, model_channels=model_channels, out_channels=out_channels,
            num_res_blocks=num_res_blocks, attention_resolutions=list(attention_resolutions), dropout=dropout,
            channel_mult=list(channel_mult), conv_resample=conv_resample, dims=dims, context_dim=context_dim,
            use_scale_shift_norm=use_scale_shift_norm, resblock_updown=resblock_updown, num_heads=num_heads,
            num_head_channels=num_head_channels, transformer_depth=transformer_depth, use_linear=use_linear,
            temporal_conv=temporal_conv, tempspatial_aware=tempspatial_aware, temporal_attention=temporal_attention,
            use_relative_position=use_relative_position, use_causal_attention=use_causal_attention,
            temporal_length=temporal_length, addition_attention=addition_attention,
            temporal_selfatt_only=temporal_selfatt_only, image_cross_attention=image_cross_attention,
            image_cross_attention_scale_learnable=image_cross_attention_scale_learnable, default_fs=default_fs,
            fs_condition=fs_condition,
        )
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.addition_attention = addition_attention
        self.temporal_length = temporal_length
        self.default_fs = default_fs
        self.fs_condition = fs_condition
        self.channels_last = False
        self.fused_kernels = False
        self.temporal_conv_2d = False
        time_embed_dim = model_channels * 4

        def heads_for(ch: int) -> tuple[int, int]:
            if num_head_channels == -1:
                return num_heads, ch // num_heads
            return ch // num_head_channels, num_head_channels

        def res_block(ch_in: int, ch_out: Optional[int] = None, **kw) -> ResBlock:
            return ResBlock(
                ch_in, time_embed_dim, dropout, out_channels=ch_out, dims=dims,
                use_scale_shift_norm=use_scale_shift_norm, **kw,
            )

        def res_block_temporal(ch_in: int, ch_out: Optional[int] = None) -> ResBlock:
            return res_block(ch_in, ch_out, tempspatial_aware=tempspatial_aware, use_temporal_conv=temporal_conv)

        def transformers(ch: int) -> list[nn.Module]:
            n_heads, d_head = heads_for(ch)
            layers: list[nn.Module] = [
                SpatialTransformer(
                    ch, n_heads, d_head, depth=transformer_depth, context_dim=context_dim, use_linear=use_linear,
                    disable_self_attn=False, video_length=temporal_length,
                    image_cross_attention=image_cross_attention,
                    image_cross_attention_scale_learnable=image_cross_attention_scale_learnable,
                )
            ]
            if temporal_attention:
                layers.append(
                    TemporalTransformer(
                        ch, n_heads, d_head, depth=transformer_depth, context_dim=context_dim, use_linear=use_linear,
                        only_self_att=True, causal_attention=use_causal_attention,
                        relative_position=use_relative_position, temporal_length=temporal_length,
                    )
                )
            return layers

        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        if fs_condition:
            self.fps_embedding = nn.Sequential(
                nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
            )
            nn.init.zeros_(self.fps_embedding[-1].weight)
            nn.init.zeros_(self.fps_embedding[-1].bias)

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3, padding=1))]
        )
        if addition_attention:
            # Always 8 heads of num_head_channels with Conv1d projections, as in the checkpoint.
            self.init_attn = TimestepEmbedSequential(
                TemporalTransformer(
                    model_channels, n_heads=8, d_head=num_head_channels, depth=transformer_depth,
                    context_dim=context_dim, only_self_att=temporal_selfatt_only, causal_attention=False,
                    relative_position=use_relative_position, temporal_length=temporal_length,
                )
            )

        input_block_chans = [model_channels]
        ch = model_channels
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res_block_temporal(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.extend(transformers(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                down = (
                    res_block(ch, ch, down=True) if resblock_updown
                    else Downsample(ch, conv_resample, dims=dims, out_channels=ch)
                )
                self.input_blocks.append(TimestepEmbedSequential(down))
                input_block_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            res_block_temporal(ch), *transformers(ch), res_block_temporal(ch)
        )

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                ich = input_block_chans.pop()
                layers = [res_block_temporal(ch + ich, model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.extend(transformers(ch))
                if level and i == num_res_blocks:
                    layers.append(
                        res_block(ch, ch, up=True) if resblock_updown
                        else Upsample(ch, conv_resample, dims=dims, out_channels=ch)
                    )
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), conv_nd(dims, model_channels, out_channels, 3, padding=1)
        )

    # -- run-time switches (no parameters involved) ---------------------------------------------

    def spatial_self_attentions(self) -> list[CrossAttention]:
        """Every spatial self-attention (``attn1`` of spatial transformers)."""
        return [
            m for name, m in self.named_modules()
            if isinstance(m, CrossAttention) and name.endswith("attn1") and not m.is_temporal_attention
        ]

    def set_temporal_window(self, enabled: bool = True, window_type: str = "prv") -> None:
        """Let each frame's spatial self-attention also see a neighbouring frame (``prv``/``first``/``roll``)."""
        if window_type not in TEMPORAL_WINDOW_TYPES:
            raise ValueError(f"window_type must be one of {TEMPORAL_WINDOW_TYPES}, got '{window_type}'.")
        for m in self.spatial_self_attentions():
            m.temporal_window_for_spatial_self_attention = enabled
            m.temporal_window_type = window_type

    def set_attention_backend(self, backend: str) -> None:
        """``"sdpa"`` (default, PyTorch) or ``"xformers"`` (only if installed)."""
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got '{backend}'.")
        for m in self.modules():
            if isinstance(m, CrossAttention):
                m.attention_backend = backend

    def set_fast_clip_norm(self, enabled: bool = True) -> None:
        """Clip-wide group norms through multi-block reductions on CUDA (default) or PyTorch's kernel."""
        for m in self.modules():
            if isinstance(m, ClipGroupNorm):
                m.fast = bool(enabled)

    def set_split_geglu(self, enabled: bool = True) -> None:
        """On CUDA, feed-forward gates as two contiguous matrix products (default) or one split in halves."""
        for m in self.modules():
            if isinstance(m, GEGLU):
                m.split = bool(enabled)

    def set_channels_last(self, enabled: bool = True) -> None:
        """Keep activations and convolution weights channels-last (the same math; the default on CUDA GPUs,
        chosen by ``MemoryManager.video_unet_channels_last``).

        Frames are then stored ``(b, t, h, w, c)``: on GPUs whose convolutions run channels-last
        (cuDNN on Volta and newer), no convolution transposes its input and output any more, the
        views between ``((b t), c, h, w)`` frames and ``(b, c, t, h, w)`` clips cost no copy, and
        spatial transformers enter and leave their ``(b t, h w, c)`` token layout for free.
        """
        self.channels_last = bool(enabled)
        for m in self.modules():
            if isinstance(m, (GroupNorm, TemporalTransformer)):
                m.channels_last = self.channels_last
            elif isinstance(m, (nn.Conv2d, nn.Conv3d)):
                layout = torch.contiguous_format
                if enabled:
                    layout = torch.channels_last if isinstance(m, nn.Conv2d) else torch.channels_last_3d
                m.weight.data = m.weight.data.contiguous(memory_format=layout)

    def set_fused_kernels(self, enabled: bool = True) -> None:
        """Run the memory-bound steps of channels-last steps as one-pass Triton kernels (``fused_kernels``):
        group norms with the SiLU after them, and feed-forward gates. Needs Triton and a CUDA GPU (or
        Triton's CPU interpreter); elsewhere the PyTorch path runs. Results differ from it by about one
        half-precision rounding (one rounding per fused step instead of two)."""
        self.fused_kernels = bool(enabled)
        for m in self.modules():
            if isinstance(m, GroupNorm):
                m.fused = self.fused_kernels
            elif isinstance(m, GEGLU):
                m.fused = self.fused_kernels
            elif isinstance(m, ResBlock):
                m.fuse_norm_activations(self.fused_kernels)

    def set_temporal_conv_2d(self, enabled: bool = True) -> None:
        """Run the temporal 3x1x1 convolutions as 3x1 2D convolutions (the same sums; see
        ``temporal_conv_as_2d``). Off by default until timed on a GPU."""
        self.temporal_conv_2d = bool(enabled)
        for m in self.modules():
            if isinstance(m, TemporalConvBlock):
                m.as_2d = self.temporal_conv_2d

    def set_attention_batch_chunk(self, chunk: int) -> None:
        """Attend ``chunk`` batch entries at a time (0 = all): exact, lower peak memory without flash kernels."""
        for m in self.modules():
            if isinstance(m, CrossAttention):
                m.batch_chunk = int(chunk)

    # -- forward ------------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context_text: Optional[torch.Tensor] = None,
        context_img: Optional[torch.Tensor] = None,
        concat_cond: Optional[torch.Tensor] = None,
        fs: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> torch.Tensor:
        """Predict the v-target.

        ``x`` (b, c, t, h, w); ``timesteps`` (b,) float or int; ``context_text`` (b, 77, d);
        ``context_img`` (b, t, tokens, d); ``concat_cond`` (b, c', t, h, w) joined on channels;
        ``fs`` (b,) int frame stride (``default_fs`` when omitted). Returns (b, out, t, h, w).
        """
        b, _, t, _, _ = x.shape
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).type(x.dtype))
        if self.fs_condition:
            if fs is None:
                fs = torch.full((b,), self.default_fs, dtype=torch.long, device=x.device)
            emb = emb + self.fps_embedding(timestep_embedding(fs, self.model_channels).type(x.dtype))
        emb = emb.repeat_interleave(t, dim=0)

        # Text context stays per clip: attention folds the frames into the query axis (same math
        # as repeating it t times, which the original did).
        if context_img is not None:
            context_img = context_img.reshape(b * t, *context_img.shape[2:])
            context = (context_text, context_img)
        else:
            context = context_text

        if concat_cond is not None:
            x = torch.cat([x, concat_cond], dim=1)
        h = x.transpose(1, 2).reshape(b * t, x.shape[1], *x.shape[3:])
        if self.channels_last:
            h = h.contiguous(memory_format=torch.channels_last)

        skips = []
        for index, module in enumerate(self.input_blocks):
            h = module(h, emb, context=context, num_frames=t)
            if index == 0 and self.addition_attention:
                h = self.init_attn(h, emb, context=context, num_frames=t)
            skips.append(h)
        h = self.middle_block(h, emb, context=context, num_frames=t)
        for module in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            h = module(h, emb, context=context, num_frames=t)
        y = self.out(h.type(x.dtype))
        return y.reshape(b, t, *y.shape[1:]).transpose(1, 2)
