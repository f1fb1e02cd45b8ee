"""Single-frame (keyframe) half of Paints-UNDO: the modified UNet, its k-diffusion sampler and prompt encoding.

Importing this package only imports code (torch, diffusers classes): it loads no weights, touches no network
and does not initialise CUDA.
"""

from .k_diffusion import KDiffusionSampler, KModel, get_sigmas_karras, sample_dpmpp_2m
from .prompt import encode_cropped_prompt_77tokens, encode_prompt
from .unet import ModifiedUNet

__all__ = [
    "KDiffusionSampler",
    "KModel",
    "ModifiedUNet",
    "encode_cropped_prompt_77tokens",
    "encode_prompt",
    "get_sigmas_karras",
    "sample_dpmpp_2m",
]
