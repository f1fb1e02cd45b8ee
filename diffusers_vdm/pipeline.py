"""The multi-frame pipeline: components, conditioning encoders and the sampler call.

Loads the official ``lllyasviel/paints_undo_multi_frame`` layout (``tokenizer``, ``text_encoder``,
``image_encoder``, ``vae``, ``image_projection``, ``unet``), each component from its own
``config.json``. Device and dtype are arguments; nothing is decided at import time.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .cuda_graphs import CUDAGraphRunner
from .dynamic_tsnr_sampler import Generators, SamplerDynamicTSNR
from .improved_clip_vision import ImprovedCLIPVisionModelWithProjection
from .loading import load_module_folder, load_transformers_model, resolve_model_folder
from .modeling import module_device, module_dtype
from .projection import Resampler
from .unet import UNet3DModel
from .vae import VideoAutoencoderKL

logger = logging.getLogger(__name__)

COMPONENTS = ("tokenizer", "text_encoder", "image_encoder", "vae", "image_projection", "unet")


class LatentVideoDiffusionPipeline:
    """Holds the six multi-frame components and runs them (see ``__call__``)."""

    def __init__(self, tokenizer, text_encoder, image_encoder, vae: VideoAutoencoderKL,
                 image_projection: Resampler, unet: UNet3DModel):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder
        self.vae = vae
        self.image_projection = image_projection
        self.unet = unet
        for module in self.modules():
            module.eval()
            module.requires_grad_(False)
        #: Replay the UNet as a CUDA graph while sampling (see ``set_cuda_graphs``).
        self.cuda_graphs = False
        self._graph_runner: Optional[CUDAGraphRunner] = None

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_local_dir: str | os.PathLike,
        dtype: Optional[torch.dtype | dict[str, torch.dtype]] = None,
        device: Optional[torch.device | str] = None,
        fp16: Optional[bool] = None,
        token: Optional[str] = None,
        revision: Optional[str] = None,
        local_files_only: Optional[bool] = None,
    ) -> "LatentVideoDiffusionPipeline":
        """Load from a hub id (via huggingface_hub's cache) or a local folder.

        ``dtype``: one dtype for every component, or ``{component: dtype}``; default float32.
        ``fp16=True`` is the original's switch (every component in float16).
        """
        folder = resolve_model_folder(repo_id_or_local_dir, revision=revision, token=token,
                                      local_files_only=local_files_only)
        if fp16:
            dtype = torch.float16

        def dtype_for(name: str) -> Optional[torch.dtype]:
            return dtype.get(name) if isinstance(dtype, dict) else dtype

        from transformers import CLIPTextModel, CLIPTokenizer

        logger.info("Loading multi-frame model from %s", folder)
        tokenizer = CLIPTokenizer.from_pretrained(str(Path(folder) / "tokenizer"))
        return cls(
            tokenizer=tokenizer,
            text_encoder=load_transformers_model(CLIPTextModel, Path(folder) / "text_encoder",
                                                 dtype_for("text_encoder"), device),
            image_encoder=load_transformers_model(ImprovedCLIPVisionModelWithProjection, Path(folder) / "image_encoder",
                                                  dtype_for("image_encoder"), device),
            vae=load_module_folder(VideoAutoencoderKL, Path(folder) / "vae", dtype_for("vae"), device),
            image_projection=load_module_folder(Resampler, Path(folder) / "image_projection",
                                                dtype_for("image_projection"), device),
            unet=load_module_folder(UNet3DModel, Path(folder) / "unet", dtype_for("unet"), device),
        )

    def modules(self) -> list[torch.nn.Module]:
        return [self.text_encoder, self.image_encoder, self.vae, self.image_projection, self.unet]

    def set_cuda_graphs(self, enabled: bool = True) -> None:
        """Sample with the UNet captured as a CUDA graph (same kernels, no per-kernel launch cost).

        Only takes effect on CUDA. The graph keeps the UNet's activations allocated between calls,
        so it suits the high VRAM mode; switching it off frees them.
        """
        self.cuda_graphs = bool(enabled)
        if not self.cuda_graphs:
            self._graph_runner = None

    def sampling_unet(self) -> torch.nn.Module:
        """The UNet the sampler calls: the module itself, or its CUDA-graph runner."""
        if not self.cuda_graphs or module_device(self.unet).type != "cuda":
            return self.unet
        if self._graph_runner is None or self._graph_runner.module is not self.unet:
            self._graph_runner = CUDAGraphRunner(self.unet)
        return self._graph_runner

    def to(self, *args, **kwargs) -> "LatentVideoDiffusionPipeline":
        for module in self.modules():
            module.to(*args, **kwargs)
        return self

    # -- conditioning ---------------------------------------------------------------------------

    @torch.inference_mode()
    def encode_cropped_prompt_77tokens(self, prompt: str) -> torch.Tensor:
        """``(1, 77, d)`` last hidden state of the prompt, truncated/padded to 77 tokens."""
        ids = self.tokenizer(prompt, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(module_device(self.text_encoder)), attention_mask=None).last_hidden_state

    @torch.inference_mode()
    def encode_clip_vision(self, frames: torch.Tensor) -> torch.Tensor:
        """``frames`` (b, 3, t, h, w) in [-1, 1] -> CLIP-vision tokens (b, t, tokens, d)."""
        b, c, t, h, w = frames.shape
        flat = frames.transpose(1, 2).reshape(b * t, c, h, w)
        flat = flat.to(device=module_device(self.image_encoder), dtype=module_dtype(self.image_encoder))
        tokens = self.image_encoder(flat).last_hidden_state
        return tokens.reshape(b, t, *tokens.shape[1:])

    @torch.inference_mode()
    def encode_latents(self, videos: torch.Tensor, return_hidden_states: bool = True):
        """``videos`` (b, 3, t, h, w) in [-1, 1] -> scaled latents (b, 4, t, h/8, w/8).

        With ``return_hidden_states``, also the encoder features of the first and last frame per
        level (each (b, c, 2, h_i, w_i)), which guide the decoder.
        """
        b, c, t, h, w = videos.shape
        flat = videos.transpose(1, 2).reshape(b * t, c, h, w).to(device=module_device(self.vae), dtype=module_dtype(self.vae))
        posterior, hidden_states = self.vae.encode(flat, return_hidden_states=return_hidden_states)
        z = posterior.mode() * self.vae.scale_factor
        z = z.reshape(b, t, *z.shape[1:]).transpose(1, 2)
        if not return_hidden_states:
            return z
        hidden_states = [hs.reshape(b, t, *hs.shape[1:])[:, [0, -1]].transpose(1, 2) for hs in hidden_states]
        return z, hidden_states

    @torch.inference_mode()
    def decode_latents(self, latents: torch.Tensor, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        """Scaled latents (b, 4, t, h, w) + encoder features -> frames (b, 3, t, 8h, 8w), about [-1, 1]."""
        b, c, t, h, w = latents.shape
        z = latents.transpose(1, 2).reshape(b * t, c, h, w)
        z = z.to(device=module_device(self.vae), dtype=module_dtype(self.vae)) / self.vae.scale_factor
        hidden_states = [hs.to(device=z.device, dtype=z.dtype) for hs in hidden_states]
        pixels = self.vae.decode(z, ref_context=hidden_states, timesteps=t)
        return pixels.reshape(b, t, *pixels.shape[1:]).transpose(1, 2)

    # -- sampling ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def __call__(
        self,
        batch_size: int = 1,
        steps: int = 50,
        guidance_scale: float = 5.0,
        positive_text_cond: Optional[torch.Tensor] = None,
        negative_text_cond: Optional[torch.Tensor] = None,
        positive_image_cond: Optional[torch.Tensor] = None,
        negative_image_cond: Optional[torch.Tensor] = None,
        concat_cond: Optional[torch.Tensor] = None,
        fs: int | torch.Tensor = 3,
        progress_tqdm: Optional[Callable] = None,
        callback: Optional[Callable[[dict], None]] = None,
        generator: Generators = None,
        batch_cfg: bool = False,
    ) -> torch.Tensor:
        """Sample video latents (batch_size, 4, t, h, w) with classifier-free guidance.

        Random numbers come from the global RNG as in the original (seed with ``torch.manual_seed``)
        unless ``generator`` is given: one, or one per batch entry. Conditions with a batch of one
        serve every entry; ``concat_cond`` may hold one clip per entry (several keyframe pairs
        sampled together).
        """
        device, dtype = module_device(self.unet), module_dtype(self.unet)
        sampler = SamplerDynamicTSNR(self.sampling_unet())

        concat_cond = concat_cond.repeat(batch_size, 1, 1, 1, 1).to(device=device, dtype=dtype)
        entries = concat_cond.shape[0]

        def per_entry(cond: torch.Tensor) -> torch.Tensor:
            if entries % cond.shape[0]:
                raise ValueError(f"A condition for {cond.shape[0]} clips does not fit a batch of {entries}.")
            return cond.repeat(entries // cond.shape[0], *([1] * (cond.dim() - 1)))

        positive_text_cond = per_entry(positive_text_cond).to(concat_cond)
        negative_text_cond = per_entry(negative_text_cond).to(concat_cond)
        positive_image_cond = per_entry(positive_image_cond).to(concat_cond)
        negative_image_cond = per_entry(negative_image_cond).to(concat_cond)
        fs = per_entry(torch.as_tensor(fs).reshape(-1)).to(dtype=torch.long, device=device)

        extra_args = dict(
            cfg_scale=guidance_scale,
            positive=dict(context_text=positive_text_cond, context_img=positive_image_cond, fs=fs, concat_cond=concat_cond),
            negative=dict(context_text=negative_text_cond, context_img=negative_image_cond, fs=fs, concat_cond=concat_cond),
        )
        return sampler(concat_cond.shape, steps, extra_args=extra_args, progress_tqdm=progress_tqdm,
                       callback=callback, generator=generator, batch_cfg=batch_cfg)
