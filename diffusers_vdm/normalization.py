"""Group normalisation over whole clips.

The video UNet normalises temporal layers over all frames of a clip at once: a ``(b, c, t, h, w)``
tensor has only ``b * groups`` groups (64 for a batched-CFG step), each of several hundred thousand
values. PyTorch's CUDA group norm reduces every group with a single thread block, so with 64 groups
most of a large GPU sits idle; on an H100 these norms took about 12 % of a video-UNet step.

``ClipGroupNorm`` has the parameters and the math of ``nn.GroupNorm``. On CUDA it takes the
statistics from PyTorch's multi-block reductions (accumulated in float32, like the native kernel)
and normalises in one pass through ``batch_norm`` in its inference form, fed per-(clip, channel)
statistics. Everywhere else it is ``nn.GroupNorm`` itself, so CPU results are unchanged.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


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


class ClipGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and state-dict keys) with a fast CUDA path for whole clips.

    ``fast = False`` forces PyTorch's own kernel (the reference path, for comparisons).
    """

    fast: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast and x.is_cuda and x.dim() == 5:
            return wide_group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return super().forward(x)


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
