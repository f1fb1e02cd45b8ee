"""Generator of "Informative Drawings" (Chan et al. 2022), as used by ``LineartDetector``.

The checkpoints ``sk_model.pth`` (fine) and ``sk_model2.pth`` (coarse) of ``lllyasviel/Annotators`` share
one layout: a ResNet-style image-to-image generator with reflection padding and InstanceNorm without affine
parameters (so the state dict only holds convolution weights and biases).

Attribute names (``model0`` .. ``model4``, ``conv_block``) and the positions of the layers inside each
``nn.Sequential`` are fixed by the checkpoint keys; everything else here is free.
"""

from __future__ import annotations

import torch
from torch import nn


def _instance_norm(channels: int) -> nn.InstanceNorm2d:
    # affine=False, track_running_stats=False: no tensors in the state dict.
    return nn.InstanceNorm2d(channels, eps=1e-5, affine=False, track_running_stats=False)


class ReflectResidualBlock(nn.Module):
    """``x + F(x)`` with ``F`` = two reflection-padded 3x3 convs, InstanceNorm after each (ReLU between)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        # Indices 1 and 5 carry the convs: keys ``conv_block.1.*`` and ``conv_block.5.*``.
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, kernel_size=3),
            _instance_norm(channels),
            nn.ReLU(),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, kernel_size=3),
            _instance_norm(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class InformativeDrawingsGenerator(nn.Module):
    """Image -> line drawing. Output size is ``4*ceil(H/4) x 4*ceil(W/4)`` for the default two down-steps.

    Args:
        in_channels: channels of the input picture (3 for RGB).
        out_channels: channels of the output drawing (1).
        base_channels: width of the first stage; doubled at every down-step.
        num_downsamples: stride-2 stages before the residual trunk (mirrored by transposed convs).
        num_res_blocks: residual blocks in the trunk (3 for the Annotators checkpoints).
        sigmoid: squash the output to [0, 1].
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        base_channels: int = 64,
        num_downsamples: int = 2,
        num_res_blocks: int = 3,
        sigmoid: bool = True,
    ) -> None:
        super().__init__()
        self.model0 = nn.Sequential(
            nn.ReflectionPad2d(3),
            nn.Conv2d(in_channels, base_channels, kernel_size=7),
            _instance_norm(base_channels),
            nn.ReLU(),
        )

        down: list[nn.Module] = []
        channels = base_channels
        for _ in range(num_downsamples):
            down += [
                nn.Conv2d(channels, channels * 2, kernel_size=3, stride=2, padding=1),
                _instance_norm(channels * 2),
                nn.ReLU(),
            ]
            channels *= 2
        self.model1 = nn.Sequential(*down)

        self.model2 = nn.Sequential(*(ReflectResidualBlock(channels) for _ in range(num_res_blocks)))

        up: list[nn.Module] = []
        for _ in range(num_downsamples):
            up += [
                nn.ConvTranspose2d(channels, channels // 2, kernel_size=3, stride=2, padding=1, output_padding=1),
                _instance_norm(channels // 2),
                nn.ReLU(),
            ]
            channels //= 2
        self.model3 = nn.Sequential(*up)

        head: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(channels, out_channels, kernel_size=7)]
        if sigmoid:
            head.append(nn.Sigmoid())
        self.model4 = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in (self.model0, self.model1, self.model2, self.model3, self.model4):
            x = stage(x)
        return x
