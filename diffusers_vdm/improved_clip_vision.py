"""CLIP-Vision (ViT-H) that accepts any aspect ratio, with inputs in [-1, 1] like the VAE.

The image is resized so its short side is 16 patches (bicubic, antialiased) and the 16x16
position grid is nearest-interpolated to the patch grid, keeping the class-token row. Everything
else is transformers' ``CLIPVisionModelWithProjection``; callers read ``last_hidden_state``
(before the post layer norm).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import CLIPVisionModelWithProjection
from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess(image: torch.Tensor, patch_size: int = 14, grid: int = 16) -> torch.Tensor:
    """``[0, 1]`` images -> CLIP-normalised, short side resized to ``grid`` patches.

    Sizes use Python's ``round`` (half to even), as the original.
    """
    h, w = image.shape[2], image.shape[3]
    scale = grid / min(h, w)
    size = (patch_size * round(scale * h), patch_size * round(scale * w))
    image = F.interpolate(image, size=size, mode="bicubic", antialias=True)
    mean = torch.tensor(CLIP_MEAN, device=image.device, dtype=image.dtype)[None, :, None, None]
    std = torch.tensor(CLIP_STD, device=image.device, dtype=image.dtype)[None, :, None, None]
    return (image - mean) / std


def interpolate_position_embedding(table: torch.Tensor, height: int, width: int, grid: int = 16) -> torch.Tensor:
    """``(1 + grid*grid, c)`` table -> ``(1, 1 + height*width, c)``: cls row kept, grid nearest-resized."""
    cls, pos = table[:1], table[1:]
    pos = pos.reshape(grid, grid, -1).permute(2, 0, 1)[None]
    pos = F.interpolate(pos, size=(height, width), mode="nearest")
    pos = pos[0].permute(1, 2, 0).reshape(height * width, -1)
    return torch.cat([cls, pos])[None]


class ArbitraryAspectCLIPVisionEmbeddings(CLIPVisionEmbeddings):
    """Drop-in embeddings (same parameters) for inputs in [-1, 1] of any size and aspect ratio."""

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        # ``interpolate_pos_encoding`` is passed by transformers >= 4.44; interpolation is always on here.
        grid = self.image_size // self.patch_size
        pixel_values = preprocess(pixel_values * 0.5 + 0.5, self.patch_size, grid)
        patches = self.patch_embedding(pixel_values.to(dtype=self.patch_embedding.weight.dtype))
        b, c, h, w = patches.shape
        patches = patches.flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(b, 1, -1)
        embeddings = torch.cat([cls, patches], dim=1)
        return embeddings + interpolate_position_embedding(self.position_embedding.weight, h, w, grid)


class ImprovedCLIPVisionModelWithProjection(CLIPVisionModelWithProjection):
    """``CLIPVisionModelWithProjection`` whose embeddings take [-1, 1] images of any aspect ratio."""

    def __init__(self, config):
        super().__init__(config)
        # Same parameter names as the stock embeddings, so official checkpoints load unchanged.
        self.vision_model.embeddings = ArbitraryAspectCLIPVisionEmbeddings(config)
