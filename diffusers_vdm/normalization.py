"""Group normalisation over whole clips.

The video UNet normalises temporal layers over all frames of a clip at once: a ``(b, c, t, h, w)``
tensor has only ``b * groups`` groups (64 for a batched-CFG step), each of several hundred thousand
values. PyTorch's CUDA group norm reduces every group with a single thread block, so with 64 groups
most of a large GPU sits idle; on an H100 these norms took about 12 % of a video-UNet step.

``ClipGroupNorm`` has the parameters and the math of ``nn.GroupNorm``. On CUDA it takes the
statistics from PyTorch's multi-block reductions (accumulated in float32, like the native kernel)
and normalises in one pass through ``batch_norm`` in its inference form, fed per-(clip, channel)
statistics. Everywhere else it is ``nn.GroupNorm`` itself, so CPU results are unchanged.

``GroupNorm`` (the base of ``ClipGroupNorm``) keeps channels-last tensors channels-last on the GPU,
for the video UNet's channels-last layout (the default on CUDA GPUs) (``UNet3DModel.set_channels_last``).
With ``fused`` set (``UNet3DModel.set_fused_kernels``) such norms, and the SiLU after them, run as
the one-pass Triton kernels of ``fused_kernels``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import fused_kernels


def wide_group_norm(
    x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float
) -> torch.Tensor:
    """``F.group_norm(x, num_groups, weight, bias, eps)`` for few, very large groups.

    Mean and mean square come from two float32 reductions over each group (biased variance, as
    group norm uses); ``batch_norm`` then applies ``(x - mean) / sqrt(var + eps) * weight + bias``
    with float32 arithmetic, treating each (batch entry, channel) pair as one channel.
    """
    b, c = x.shape[:2]
    x = x.contiguous()
    grouped = x.view(b, num_groups, -1)
    count = grouped.shape[-1]
    stats_dtype = torch.promote_types(x.dtype, torch.float32)
    mean = grouped.mean(dim=-1, dtype=stats_dtype)
    mean_square = torch.linalg.vector_norm(grouped, dim=-1, dtype=stats_dtype).square_().div_(count)
    var = (mean_square - mean.square()).clamp_(min=0.0)
    per_group = c // num_groups
    mean = mean.repeat_interleave(per_group, dim=1).reshape(b * c)
    var = var.repeat_interleave(per_group, dim=1).reshape(b * c)
    weight = None if weight is None else weight.to(stats_dtype).repeat(b)
    bias = None if bias is None else bias.to(stats_dtype).repeat(b)
    y = F.batch_norm(x.view(1, b * c, -1), mean, var, weight, bias, training=False, eps=eps)
    return y.view_as(x)


def channels_last_format(x: torch.Tensor) -> Optional[torch.memory_format]:
    """``channels_last`` / ``channels_last_3d`` when ``x`` is laid out channels-last (and is not also
    plainly contiguous, as single-channel or 1x1 tensors are), else ``None``."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return None


def channels_last_group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    out: Optional[torch.Tensor] = None,
    silu: bool = False,
    fused: bool = False,
    offset: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``F.group_norm`` of a channels-last ``x`` (4D or 5D), or of ``x + offset`` for an ``offset`` of
    one value per (sample, channel), returned channels-last (then SiLU if asked).

    PyTorch's CUDA group norm makes a channels-first copy of such an input and returns a
    channels-first result, which the next convolution transposes back. Here the statistics come
    from per-(sample, channel) float32 sums over the contiguous ``(b, pixels, c)`` view (column
    reductions), are merged per group, and are folded into one float32 scale and shift per
    (sample, channel); a single ``addcmul`` then writes ``x * scale + shift`` in ``x``'s dtype and
    layout, or into ``out`` (any strides: a transformer can have its token layout written directly).

    ``fused`` (where ``fused_kernels.usable``) reads ``x`` once for the statistics and once more to
    write the result, SiLU included (``fused_kernels``), instead of twice and once plus a SiLU pass.
    It also folds ``offset`` into the statistics and the shift instead of adding it in a pass of its
    own: with per-channel sums ``S`` and ``Q`` of ``x`` and ``x²`` over ``P`` pixels, ``x + e`` has the
    sums ``S + P e`` and ``Q + 2 e S + P e²``, and normalises to ``x * scale + (shift + e * scale)``.
    Unfused, ``x + offset`` is computed first, as the original does.
    """
    b, c = x.shape[:2]
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, offset))
    fused = fused and not wants_grad and fused_kernels.usable(x)
    kernel_writes = fused and (out is None or out.stride() == x.stride())
    if offset is not None and not kernel_writes:
        x, offset = x + offset, None  # x's layout: the sum takes its first operand's
    per_group = c // num_groups
    rows = x.movedim(1, -1).reshape(b, -1, c)  # a view: channels are the innermost axis
    count = rows.shape[1] * per_group
    f32 = torch.promote_types(x.dtype, torch.float32)
    # Few kernels on the small (b, c) tensors: each costs a launch, whatever its size.
    if fused:
        sums = torch.stack(fused_kernels.channel_moments(x))
    else:
        sums = torch.stack((rows.sum(dim=1, dtype=f32), torch.linalg.vector_norm(rows, dim=1, dtype=f32).square_()))
    if offset is not None:
        e, pixels = offset.to(f32).reshape(b, c), rows.shape[1]
        channel_sum, channel_square = sums.unbind(0)
        sums = torch.stack((channel_sum + pixels * e, channel_square + e * (2 * channel_sum + pixels * e)))
    mean, mean_square = (sums.view(2, b, num_groups, per_group).sum(-1) / count).unbind(0)  # (b, groups)
    rstd = torch.addcmul(mean_square, mean, mean, value=-1).clamp_(min=0.0).add_(eps).rsqrt_()
    mean, rstd = mean[..., None], rstd[..., None]  # (b, groups, 1), against (groups, per_group) parameters
    grouped = (num_groups, per_group)
    scale = rstd.expand(b, *grouped) if weight is None else rstd * weight.to(f32).view(grouped)
    shift = scale * mean.neg() if bias is None else torch.addcmul(bias.to(f32).view(grouped), mean, scale, value=-1)
    if kernel_writes:
        if offset is not None:
            shift = torch.addcmul(shift.reshape(b, c), e, scale.reshape(b, c))
        return fused_kernels.scale_shift(x, scale, shift, silu=silu, out=out)
    broadcast = (b, c) + (1,) * (x.dim() - 2)
    shift, scale = shift.reshape(broadcast), scale.reshape(broadcast)
    if wants_grad or torch.compiler.is_compiling():
        # ``out=`` has no gradient and stops a torch.compile graph; compiled, the plain form fuses anyway.
        y = torch.addcmul(shift, x, scale).to(x.dtype)
        y = F.silu(y) if silu else y
        return y if out is None else out.copy_(y)
    if out is None:
        out = torch.empty_like(x)  # keeps the channels-last strides
    torch.addcmul(shift, x, scale, out=out)
    return F.silu(out, inplace=True) if silu else out


def native_group_norm_keeps_channels_last(device: torch.device) -> bool:
    """PyTorch's CPU group norm keeps channels-last tensors channels-last; its CUDA one does not."""
    return device.type == "cpu"


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and state-dict keys) that, once ``channels_last`` is set, keeps
    channels-last inputs channels-last off the CPU (where PyTorch's own kernel already does).

    ``fused`` (``UNet3DModel.set_fused_kernels``) sends channels-last inputs through the fused Triton
    kernels where they can run; ``applies_silu`` makes the norm apply the SiLU that follows it (whose
    ``FusableSiLU`` then passes its input through), so that a fused kernel writes both in one pass.
    """

    channels_last: bool = False
    fused: bool = False
    applies_silu: bool = False

    def forward(
        self, x: torch.Tensor, out: Optional[torch.Tensor] = None, offset: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """The group norm of ``x``, or of ``x + offset`` (``offset`` broadcast per sample and channel,
        ``(b, c, 1, ...)``), then SiLU if ``applies_silu``; written into ``out`` (same shape, any
        strides) when given."""
        if self.channels_last and channels_last_format(x) is not None and (
            not native_group_norm_keeps_channels_last(x.device) or (self.fused and fused_kernels.usable(x))
        ):
            return channels_last_group_norm(
                x, self.num_groups, self.weight, self.bias, self.eps, out=out, silu=self.applies_silu,
                fused=self.fused, offset=offset,
            )
        if offset is not None:
            x = x + offset
        y = self._forward(x)
        if self.applies_silu:
            y = F.silu(y)
        return y if out is None else out.copy_(y)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


class FusableSiLU(nn.SiLU):
    """``nn.SiLU`` that passes its input through while the group norm before it applies the SiLU
    (``fuse_norm_silu``)."""

    applied_by_norm: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.applied_by_norm else super().forward(x)


def fuse_norm_silu(layers: nn.Sequential, enabled: bool) -> None:
    """Let ``layers[0]``, a ``GroupNorm``, apply the ``FusableSiLU`` at ``layers[1]`` (or give it back)."""
    norm, activation = layers[0], layers[1]
    if not isinstance(norm, GroupNorm) or not isinstance(activation, FusableSiLU):
        raise TypeError(f"expected GroupNorm then FusableSiLU, got {type(norm).__name__}, {type(activation).__name__}")
    norm.applies_silu = activation.applied_by_norm = bool(enabled)


class ClipGroupNorm(GroupNorm):
    """``GroupNorm`` with a fast GPU path for whole clips ``(b, c, t, h, w)``.

    ``fast = False`` forces PyTorch's own kernel (the reference path, for comparisons). The path is
    also taken on ``meta``, where the benchmarks count what the GPU path allocates and moves.
    """

    fast: bool = True

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast and x.device.type in ("cuda", "meta") and x.dim() == 5:
            return wide_group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return super()._forward(x)


# -- group statistics gathered piece by piece --------------------------------------------------------
#
# A group norm over a whole clip needs statistics of the whole clip before any value can be
# normalised. To normalise a clip that is processed one spatial tile at a time, the statistics are
# gathered tile by tile and merged (Chan et al.'s pairwise update, numerically stable), then applied
# to each tile. Everything is accumulated in float32, as PyTorch's own group norm does.


GroupMoments = tuple[torch.Tensor, torch.Tensor, int]  # mean, sum of squared deviations, count


def group_moments(x: torch.Tensor, num_groups: int) -> GroupMoments:
    """Float32 mean and sum of squared deviations of each (batch entry, group) of ``x`` ``(b, c, ...)``."""
    b = x.shape[0]
    grouped = x.to(torch.float32).contiguous().view(b, num_groups, -1)
    var, mean = torch.var_mean(grouped, dim=-1, correction=0)
    count = grouped.shape[-1]
    return mean, var * count, count


def merge_group_moments(a: Optional[GroupMoments], b: GroupMoments) -> GroupMoments:
    """Moments of the union of two disjoint parts of every group."""
    if a is None:
        return b
    mean_a, m2_a, n_a = a
    mean_b, m2_b, n_b = b
    n = n_a + n_b
    delta = mean_b - mean_a
    return mean_a + delta * (n_b / n), m2_a + m2_b + delta.square() * (n_a * n_b / n), n


def normalize_with_moments(
    x: torch.Tensor,
    moments: GroupMoments,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` per group, computed in float32, in ``x``'s dtype.

    ``x`` may be any part of the tensor the moments were gathered from that keeps whole channels
    (a spatial tile): the result equals that part of the group norm of the whole tensor.
    """
    mean, m2, count = moments
    b, c = x.shape[:2]
    num_groups = mean.shape[1]
    rstd = torch.rsqrt(m2 / count + eps)
    y = x.to(torch.float32, memory_format=torch.contiguous_format, copy=True)  # the only temporary
    y.view(b, num_groups, -1).sub_(mean[..., None]).mul_(rstd[..., None])
    channel_shape = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        y.mul_(weight.to(torch.float32).view(channel_shape))
    if bias is not None:
        y.add_(bias.to(torch.float32).view(channel_shape))
    return y.to(x.dtype)
