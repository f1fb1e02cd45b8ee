"""The single-frame (keyframe) UNet of Paints-UNDO.

``ModifiedUNet`` is an SD1.5 ``UNet2DConditionModel`` with two extra conditions:

* **concat cond** -- the VAE latent of the input image, concatenated *after* the 4 noisy-latent channels,
  so ``conv_in`` takes 8 channels although the saved config says ``in_channels: 4``;
* **coded cond** -- the "operation step" (undo step, an int in 0..999 per sample), embedded like a timestep
  (``add_time_proj`` + ``add_embedding``) and *added* to the time embedding, although the saved config says
  ``addition_embed_type: null``.

The original bolted both on with instance-level forward hooks after ``from_config``; here they are part of the
class so that ``from_config`` / ``from_pretrained`` build the exact checkpoint layout and the call signature is
explicit. The original call convention (both conds inside ``cross_attention_kwargs``) is still accepted.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

logger = logging.getLogger(__name__)

#: Channels of the concatenated image latent (appended after the noisy latent's channels).
CONCAT_COND_CHANNELS = 4
#: Width of the sinusoidal projection of the coded cond (undo step), as in the original.
CODED_COND_PROJ_DIM = 256
#: Keys of ``cross_attention_kwargs`` that the original used to smuggle the extra conds through diffusers.
_COND_KEYS = ("concat_conds", "coded_conds")


def _repeat_to_batch(cond: torch.Tensor, batch_size: int, name: str) -> torch.Tensor:
    """Tile ``cond`` along dim 0 up to ``batch_size`` (``cat([c] * (B // b))``, the original's broadcast)."""
    if cond.shape[0] == batch_size:
        return cond
    if cond.shape[0] == 0 or batch_size % cond.shape[0] != 0:
        raise ValueError(f"{name} has batch {cond.shape[0]}, which does not divide the sample batch {batch_size}.")
    return torch.cat([cond] * (batch_size // cond.shape[0]), dim=0)


class ModifiedUNet(UNet2DConditionModel):
    """``UNet2DConditionModel`` + 8-channel ``conv_in`` (concat cond) + coded-cond embedding added to ``temb``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)

        # The checkpoint's conv_in takes [noisy latent (in_channels), image latent (4)]; the config keeps
        # in_channels=4 because the original widened conv_in after construction.
        old = self.conv_in
        self.conv_in = torch.nn.Conv2d(
            old.in_channels + CONCAT_COND_CHANNELS,
            old.out_channels,
            kernel_size=old.kernel_size,
            stride=old.stride,
            padding=old.padding,
        )

        # Coded cond (undo step) embedding; its width must match the time embedding it is added to
        # (1280 for SD1.5, hard-coded in the original).
        time_embed_dim = self.time_embedding.linear_2.out_features
        self.add_time_proj = Timesteps(CODED_COND_PROJ_DIM, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.add_embedding = TimestepEmbedding(CODED_COND_PROJ_DIM, time_embed_dim)

    # diffusers reads the constructor's signature to map config keys to kwargs (``extract_init_dict``);
    # expose the parent's signature so the saved ``config.json`` loads unchanged.
    __init__.__signature__ = inspect.signature(UNet2DConditionModel.__init__)  # type: ignore[attr-defined]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, strict: bool = True, **kwargs: Any):
        """diffusers ``from_pretrained`` that, with ``strict`` (default), raises unless every key matches.

        diffusers only *warns* about missing / unexpected / mismatched keys, which would silently leave
        randomly initialised (or meta) parameters behind; the checkpoint must be consumed exactly.
        """
        want_info = bool(kwargs.pop("output_loading_info", False))
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        if strict:
            problems = {k: list(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
            problems = {k: v for k, v in problems.items() if v}
            if problems:
                raise RuntimeError(
                    f"{cls.__name__}.from_pretrained({pretrained_model_name_or_path!r}) does not match the "
                    f"checkpoint exactly: {problems}"
                )
        return (model, info) if want_info else model

    def get_aug_embed(
        self,
        emb: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        added_cond_kwargs: dict[str, Any] | None,
    ) -> torch.Tensor | None:
        """Embedding of the coded cond (undo step), added by ``forward`` to the time embedding.

        Replaces diffusers' ``addition_embed_type`` dispatch: the config says ``null`` but the weights exist.
        Returns ``None`` when no ``coded_conds`` are given (``forward`` always passes them).
        """
        coded_conds = (added_cond_kwargs or {}).get("coded_conds")
        if coded_conds is None:
            return None
        batch_size = coded_conds.shape[0]
        proj = self.add_time_proj(coded_conds.flatten()).reshape(batch_size, -1)
        proj = proj.to(emb)  # Timesteps returns float32; follow temb's dtype/device
        return self.add_embedding(proj)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        concat_conds: torch.Tensor | None = None,
        coded_conds: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
        added_cond_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> UNet2DConditionOutput | tuple:
        """Predict noise for ``sample`` [B, 4, h, w] given the image latent and the undo step.

        Args:
            concat_conds: image latent [b', 4, h, w], tiled to B and concatenated after ``sample``'s channels.
            coded_conds: undo steps, int [b'] (0..999), tiled to B.
            cross_attention_kwargs: passed on to the attention processors; for compatibility with the original
                it may carry ``concat_conds`` / ``coded_conds``, which are taken out here.
            Other keyword arguments go to ``UNet2DConditionModel.forward`` unchanged.
        """
        if cross_attention_kwargs is not None and any(k in cross_attention_kwargs for k in _COND_KEYS):
            cross_attention_kwargs = dict(cross_attention_kwargs)
            if "concat_conds" in cross_attention_kwargs:
                if concat_conds is not None:
                    raise ValueError("concat_conds given both explicitly and in cross_attention_kwargs.")
                concat_conds = cross_attention_kwargs.pop("concat_conds")
            if "coded_conds" in cross_attention_kwargs:
                if coded_conds is not None:
                    raise ValueError("coded_conds given both explicitly and in cross_attention_kwargs.")
                coded_conds = cross_attention_kwargs.pop("coded_conds")
            cross_attention_kwargs = cross_attention_kwargs or None

        if concat_conds is None:
            raise ValueError(
                f"{type(self).__name__} needs concat_conds (the image latent, [b, "
                f"{CONCAT_COND_CHANNELS}, h, w]): its conv_in takes {self.conv_in.in_channels} channels."
            )
        batch_size = sample.shape[0]
        concat_conds = _repeat_to_batch(concat_conds, batch_size, "concat_conds").to(sample)
        sample = torch.cat([sample, concat_conds], dim=1)

        if coded_conds is None:
            raise ValueError(f"{type(self).__name__} needs coded_conds (the undo step per sample, int in 0..999).")
        coded_conds = torch.as_tensor(coded_conds)
        if coded_conds.ndim == 0:
            coded_conds = coded_conds[None]
        coded_conds = _repeat_to_batch(coded_conds, batch_size, "coded_conds").to(sample.device)
        added_cond_kwargs = {**(added_cond_kwargs or {}), "coded_conds": coded_conds}

        return super().forward(
            sample,
            timestep,
            encoder_hidden_states,
            cross_attention_kwargs=cross_attention_kwargs,
            added_cond_kwargs=added_cond_kwargs,
            return_dict=return_dict,
            **kwargs,
        )
