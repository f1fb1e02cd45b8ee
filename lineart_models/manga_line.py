"""Residual U-Net of MangaLineExtraction ("res_skip", Li et al.), checkpoint ``erika.pth``.

A pre-activation ResNet encoder (BatchNorm -> LeakyReLU(0.2) -> conv) with stage widths 24..384 and four
stride-2 steps, a mirrored decoder that upsamples with nearest x2 after a conv, additive skips between
matching encoder/decoder stages, and a final pre-activation 1x1 conv to one channel. BatchNorm uses
``eps=1e-3`` (the Keras default of the model's origin) and runs in eval mode, so the state dict carries
``running_mean``/``running_var``/``num_batches_tracked`` for every norm.

Key layout: ``block{0..9}.model.{i}.{conv1,residual,shortcut}`` and ``conv15``; inside a pre-activation
unit the norm is at index 0 and the conv at index 2; a projection shortcut's conv is at index 0. The four
skip additions between stages have no parameters and are plain ``+`` in ``forward``.
"""

from __future__ import annotations

import torch
from torch import nn

#: (channels, repetitions) of the encoder stages block0..block4.
ENCODER_STAGES: tuple[tuple[int, int], ...] = ((24, 2), (48, 3), (96, 5), (192, 7), (384, 12))


class PreActConv(nn.Module):
    """BatchNorm(eps=1e-3) -> LeakyReLU(0.2) -> zero-padded conv [-> nearest x2 upsample]."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, upsample: bool = False
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.BatchNorm2d(in_channels, eps=1e-3),
            nn.LeakyReLU(0.2),
            nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2),
        ]
        if upsample:
            layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class Shortcut(nn.Module):
    """Identity, or a 1x1 (strided) projection [+ nearest x2 upsample] when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, upsample: bool = False) -> None:
        super().__init__()
        self.model: nn.Sequential | None = None
        if in_channels != out_channels or stride != 1:
            layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride)]
            if upsample:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
            self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.model is None else self.model(x)


class ResUnit(nn.Module):
    """Two pre-activation 3x3 convs plus a shortcut; ``stride=2`` halves, ``upsample=True`` doubles the size."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, upsample: bool = False) -> None:
        super().__init__()
        self.conv1 = PreActConv(in_channels, out_channels, stride=stride, upsample=upsample)
        self.residual = PreActConv(out_channels, out_channels)
        self.shortcut = Shortcut(in_channels, out_channels, stride=stride, upsample=upsample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.residual(self.conv1(x))


class ResStage(nn.Module):
    """A chain of ``ResUnit``s (attribute ``model``, as in the checkpoint).

    Encoder stages downsample in their LAST unit (unless ``keep_size``); decoder stages (``upsample=True``)
    upsample in their FIRST unit.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        repetitions: int,
        *,
        keep_size: bool = False,
        upsample: bool = False,
    ) -> None:
        super().__init__()
        units = []
        for i in range(repetitions):
            unit_in = in_channels if i == 0 else out_channels
            if upsample:
                units.append(ResUnit(unit_in, out_channels, upsample=(i == 0)))
            else:
                stride = 2 if (i == repetitions - 1 and not keep_size) else 1
                units.append(ResUnit(unit_in, out_channels, stride=stride))
        self.model = nn.Sequential(*units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class MangaLineNet(nn.Module):
    """Gray picture (raw 0..255, H and W multiples of 16) -> line map of the same size (unbounded values).

    Args:
        in_channels: input channels (1).
        out_channels: output channels (1).
        stages: ``(channels, repetitions)`` of the five encoder stages; the decoder mirrors stages 3..0.
        head_channels: width of the last full-resolution stage before the 1x1 output conv.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        stages: tuple[tuple[int, int], ...] = ENCODER_STAGES,
        head_channels: int = 16,
    ) -> None:
        super().__init__()
        if len(stages) != 5:
            raise ValueError("MangaLineNet expects exactly five encoder stages.")
        (c0, r0), (c1, r1), (c2, r2), (c3, r3), (c4, r4) = stages
        self.block0 = ResStage(in_channels, c0, r0, keep_size=True)
        self.block1 = ResStage(c0, c1, r1)
        self.block2 = ResStage(c1, c2, r2)
        self.block3 = ResStage(c2, c3, r3)
        self.block4 = ResStage(c3, c4, r4)
        self.block5 = ResStage(c4, c3, r3, upsample=True)
        self.block6 = ResStage(c3, c2, r2, upsample=True)
        self.block7 = ResStage(c2, c1, r1, upsample=True)
        self.block8 = ResStage(c1, c0, r0, upsample=True)
        self.block9 = ResStage(c0, head_channels, 2, keep_size=True)
        self.conv15 = PreActConv(head_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e0 = self.block0(x)
        e1 = self.block1(e0)
        e2 = self.block2(e1)
        e3 = self.block3(e2)
        d = self.block4(e3)
        d = e3 + self.block5(d)
        d = e2 + self.block6(d)
        d = e1 + self.block7(d)
        d = e0 + self.block8(d)
        return self.conv15(self.block9(d))
