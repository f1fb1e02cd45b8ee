"""Finding and loading the public line-art checkpoints of ``lllyasviel/Annotators``.

Resolution order for a file such as ``sk_model.pth``:
  1. ``model_dir`` given to the detector, else the folder named by ``$PAINTS_UNDO_LINEART_DIR``;
  2. ``huggingface_hub.hf_hub_download`` from ``lllyasviel/Annotators`` (HF cache, ``HF_ENDPOINT`` and
     ``HF_HUB_OFFLINE`` honoured).
Nothing here runs at import time; ``huggingface_hub`` itself is imported only when a download is needed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from state_dicts import describe_mismatch

logger = logging.getLogger(__name__)

ANNOTATORS_REPO = "lllyasviel/Annotators"
LINEART_DIR_ENV = "PAINTS_UNDO_LINEART_DIR"
_PREFIX = "module."


class LineartWeightsNotFoundError(FileNotFoundError):
    """A checkpoint is neither in the local folder nor downloadable."""


class LineartCheckpointError(ValueError):
    """A checkpoint file exists but cannot be read or does not fit the network."""


def local_weights_dir(model_dir: str | os.PathLike | None) -> Path | None:
    """The folder to search first: ``model_dir``, else ``$PAINTS_UNDO_LINEART_DIR``, else ``None``."""
    if model_dir is not None and str(model_dir) != "":
        return Path(model_dir).expanduser()
    env = os.environ.get(LINEART_DIR_ENV)
    return Path(env).expanduser() if env else None


def resolve_weights(filename: str, model_dir: str | os.PathLike | None = None) -> Path:
    """Path of ``filename``: from the local folder if present, else downloaded from the hub (cached).

    Raises:
        LineartWeightsNotFoundError: with one sentence naming the file, the folder searched and the fixes.
    """
    folder = local_weights_dir(model_dir)
    if folder is not None:
        candidate = folder / filename
        if candidate.is_file():
            return candidate
        logger.info("%s not found in %s; trying the Hugging Face hub (%s)", filename, folder, ANNOTATORS_REPO)
    try:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(repo_id=ANNOTATORS_REPO, filename=filename))
    except Exception as err:  # offline, no network, missing entry, HTTP errors: one clear message
        if folder is not None:
            where = f"in '{folder}'"
            fix = (
                f"put {filename} into '{folder}' (or into another folder passed as model_dir or named by "
                f"${LINEART_DIR_ENV})"
            )
        else:
            where = "in the Hugging Face cache (no model_dir given and $" + LINEART_DIR_ENV + " unset)"
            fix = f"put {filename} into a folder and pass it as model_dir or name it in ${LINEART_DIR_ENV}"
        raise LineartWeightsNotFoundError(
            f"Line-art weights '{filename}' are not {where} and could not be downloaded from the Hugging Face "
            f"repo {ANNOTATORS_REPO} ({_short_reason(err)}); {fix}, or allow downloads (network access, "
            "HF_HUB_OFFLINE unset)."
        ) from err
    logger.info("Using %s from the Hugging Face cache: %s", filename, path)
    return path


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a ``.pth`` state dict safely (``weights_only=True``) on the CPU and strip a ``module.`` prefix.

    Raises:
        LineartCheckpointError: if the file cannot be unpickled or is not a flat ``{name: tensor}`` mapping.
    """
    path = Path(path)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise LineartCheckpointError(
            f"Could not read line-art checkpoint {path} ({_short_reason(err)}); the file is probably "
            "corrupt or truncated: delete it and download it again."
        ) from err
    if not isinstance(raw, Mapping) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise LineartCheckpointError(
            f"Line-art checkpoint {path} is not a plain state dict of tensors (got {type(raw).__name__}); "
            "use the original file from lllyasviel/Annotators."
        )
    return strip_module_prefix(raw)


def _short_reason(err: BaseException, limit: int = 160) -> str:
    """``Type: first line of the message``, shortened: keeps error messages to one readable sentence."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    reason = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


def strip_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` prefix that ``nn.DataParallel`` checkpoints (netG.pth, erika.pth) carry."""
    return {(k[len(_PREFIX) :] if k.startswith(_PREFIX) else k): v for k, v in state_dict.items()}


def load_network(network: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> nn.Module:
    """Strictly load ``state_dict`` into ``network``; mismatches become one readable ``LineartCheckpointError``.

    ``network`` may live on the meta device: tensors are then assigned (no random init, no copy).
    """
    expected = network.state_dict()
    assign = any(t.is_meta for t in expected.values())
    problems = describe_mismatch(expected, state_dict)
    if problems:
        raise LineartCheckpointError(
            f"Line-art checkpoint {source} does not match {type(network).__name__}: {problems}; "
            "make sure it is the right file from lllyasviel/Annotators."
        )
    network.load_state_dict(dict(state_dict), strict=True, assign=assign)
    return network
