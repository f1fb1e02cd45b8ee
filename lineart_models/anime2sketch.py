"""pix2pix-style U-Net of Anime2Sketch (Xiang et al.), as used by ``LineartAnimeDetector`` (``netG.pth``).

The U-Net is nested: every level owns a ``model`` ``nn.Sequential`` that holds its down path, the next
(inner) level and its up path, so the checkpoint keys read ``model.model.1.model.3.model.3...``. Each
non-outermost level returns ``cat([x, level(x)], dim=1)``.

The original runs its LeakyReLU in place, so the skip half it concatenates is ``leaky_relu(x)`` rather than
``x``. That half only ever feeds the parent's ReLU, and ``relu(leaky_relu(x)) == relu(x)`` exactly, so this
module uses out-of-place activations and gets bit-identical results.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

LevelKind = Literal["outermost", "middle", "innermost"]


def _instance_norm(channels: int) -> nn.InstanceNorm2d:
    return nn.InstanceNorm2d(channels, eps=1e-5, affine=False, track_running_stats=False)


def _down_conv(in_ch: int, out_ch: int) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=4, stride=2, padding=1, bias=True)


def _up_conv(in_ch: int, out_ch: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(in_ch, out_ch, kernel_size=4, stride=2, padding=1, bias=True)


class UNetLevel(nn.Module):
    """One resolution level of the U-Net.

    Layer positions inside ``self.model`` (they define the checkpoint keys):
      * outermost: ``[conv, inner, ReLU, convT, Tanh]``
      * middle:    ``[LeakyReLU, conv, IN, inner, ReLU, convT, IN]``
      * innermost: ``[LeakyReLU, conv, ReLU, convT, IN]``

    Args:
        outer_channels: channels this level returns (before the skip concat).
        inner_channels: channels after this level's down conv.
        in_channels: channels this level receives; defaults to ``outer_channels``.
        inner: the next level (required unless ``kind == "innermost"``).
        kind: position of the level in the U-Net.
    """

    def __init__(
        self,
        outer_channels: int,
        inner_channels: int,
        *,
        in_channels: int | None = None,
        inner: "UNetLevel | None" = None,
        kind: LevelKind = "middle",
    ) -> None:
        super().__init__()
        if (inner is None) != (kind == "innermost"):
            raise ValueError("Only the innermost U-Net level has no inner level.")
        in_channels = outer_channels if in_channels is None else in_channels
        self.kind = kind
        if kind == "outermost":
            layers: list[nn.Module] = [
                _down_conv(in_channels, inner_channels),
                inner,
                nn.ReLU(),
                _up_conv(inner_channels * 2, outer_channels),
                nn.Tanh(),
            ]
        elif kind == "innermost":
            layers = [
                nn.LeakyReLU(0.2),
                _down_conv(in_channels, inner_channels),
                nn.ReLU(),
                _up_conv(inner_channels, outer_channels),
                _instance_norm(outer_channels),
            ]
        else:
            layers = [
                nn.LeakyReLU(0.2),
                _down_conv(in_channels, inner_channels),
                _instance_norm(inner_channels),
                inner,
                nn.ReLU(),
                _up_conv(inner_channels * 2, outer_channels),
                _instance_norm(outer_channels),
            ]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model(x)
        if self.kind == "outermost":
            return y
        return torch.cat([x, y], dim=1)


class Anime2SketchUNet(nn.Module):
    """U-Net with ``num_downs`` stride-2 levels; inputs must be multiples of ``2**num_downs`` (256).

    Args:
        in_channels: input channels (3, RGB in [-1, 1]).
        out_channels: output channels (1, tanh output).
        num_downs: number of levels (8 for ``netG.pth``).
        base_channels: channels of the outermost level (``ngf``); capped at 8x deeper down.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        num_downs: int = 8,
        base_channels: int = 64,
    ) -> None:
        super().__init__()
        if num_downs < 5:
            raise ValueError("Anime2SketchUNet needs num_downs >= 5.")
        widest = base_channels * 8
        level = UNetLevel(widest, widest, kind="innermost")
        for _ in range(num_downs - 5):
            level = UNetLevel(widest, widest, inner=level)
        for mult in (4, 2, 1):
            level = UNetLevel(base_channels * mult, base_channels * mult * 2, inner=level)
        self.model = UNetLevel(out_channels, base_channels, in_channels=in_channels, inner=level, kind="outermost")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
