"""Multi-frame (video) model of Paints-UNDO: 3D UNet, video VAE, CLIP-vision, Resampler, sampler.

Importing this package loads no weights, touches no GPU and no network.
"""

from .dynamic_tsnr_sampler import SamplerDynamicTSNR
from .improved_clip_vision import ImprovedCLIPVisionModelWithProjection
from .pipeline import LatentVideoDiffusionPipeline
from .projection import Resampler
from .unet import UNet3DModel
from .vae import VideoAutoencoderKL

__all__ = [
    "ImprovedCLIPVisionModelWithProjection",
    "LatentVideoDiffusionPipeline",
    "Resampler",
    "SamplerDynamicTSNR",
    "UNet3DModel",
    "VideoAutoencoderKL",
]
