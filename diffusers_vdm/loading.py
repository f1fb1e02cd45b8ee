"""Loading model folders in the official on-disk layout, strictly.

Every weights file must match its module exactly: a missing or unexpected key is an error, never a
warning, so a checkpoint that does not fit is reported instead of silently half-loaded.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from pathlib import Path
from typing import Iterable, Optional, Type, TypeVar

import torch
from torch import nn

from state_dicts import describe_mismatch

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=nn.Module)

WEIGHTS_NAMES = ("model.safetensors", "diffusion_pytorch_model.safetensors", "pytorch_model.bin")


class ModelFilesNotFoundError(FileNotFoundError):
    """Model files are neither on disk nor downloadable. The message says what to provide."""


class IncompatibleCheckpointError(ValueError):
    """A weights file does not fit the model built from its config."""


def resolve_model_folder(
    repo_id_or_local_dir: str | os.PathLike,
    *,
    revision: Optional[str] = None,
    token: Optional[str] = None,
    local_files_only: Optional[bool] = None,
    allow_patterns: Optional[Iterable[str]] = None,
) -> Path:
    """A local folder for a hub id or folder path; hub ids go through huggingface_hub's cache.

    ``HF_ENDPOINT``, ``HF_HOME`` and ``HF_HUB_OFFLINE`` are honoured by huggingface_hub itself.
    """
    path = Path(repo_id_or_local_dir).expanduser()
    if path.is_dir():
        return path
    text = str(repo_id_or_local_dir)
    if path.is_absolute() or text.startswith((".", "~")) or text.count("/") != 1:
        raise ModelFilesNotFoundError(
            f"Model folder '{text}' does not exist; pass an existing folder or a hub id such as 'owner/name'."
        )
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            repo_id=text,
            revision=revision,
            token=token,
            local_files_only=bool(local_files_only),
            allow_patterns=list(allow_patterns) if allow_patterns else None,
        )
    except Exception as exc:  # huggingface_hub raises several types for offline / missing / auth
        raise ModelFilesNotFoundError(
            f"Could not get '{text}' from the Hugging Face hub ({type(exc).__name__}); download it with "
            f"`huggingface-cli download {text}` on a connected machine or pass a local folder."
        ) from exc
    return Path(folder)


def read_config(folder: Path) -> dict:
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        raise ModelFilesNotFoundError(f"'{config_path}' is missing.")
    try:
        return json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise IncompatibleCheckpointError(f"'{config_path}' is not valid JSON: {exc}.") from exc


def find_weights_file(folder: Path) -> Path:
    for name in WEIGHTS_NAMES:
        candidate = Path(folder) / name
        if candidate.is_file():
            return candidate
    raise ModelFilesNotFoundError(f"No weights file ({' or '.join(WEIGHTS_NAMES)}) in '{folder}'.")


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors (or torch pickle, loaded with ``weights_only=True``) file, on the CPU."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise IncompatibleCheckpointError(f"Could not read weights file '{path}': {exc}.") from exc


def check_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raise ``IncompatibleCheckpointError`` unless names and shapes match exactly."""
    problems = describe_mismatch(model.state_dict(keep_vars=True), state_dict)
    if problems:
        raise IncompatibleCheckpointError(f"Weights in '{source}' do not fit {type(model).__name__}: {problems}.")


def build_from_config(cls: Type[M], config: dict, source: str = "config") -> M:
    """``cls(**config)`` on the meta device (no memory, no random init); unknown keys are an error."""
    params = inspect.signature(cls.__init__).parameters
    accepts_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    unknown = sorted(k for k in config if k not in params and not k.startswith("_"))
    if unknown and not accepts_any:
        raise IncompatibleCheckpointError(f"{source} has keys {unknown} that {cls.__name__} does not know.")
    kwargs = {k: v for k, v in config.items() if k in params or accepts_any}
    with torch.device("meta"):
        return cls(**kwargs)


def load_module_folder(
    cls: Type[M],
    folder: str | os.PathLike,
    dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device | str] = None,
) -> M:
    """Build ``cls`` from ``folder/config.json`` and load ``folder``'s weights strictly.

    The layout is what ``huggingface_hub.PyTorchModelHubMixin`` writes (``config.json`` holding
    the constructor kwargs, plus ``model.safetensors``), i.e. the official Paints-UNDO layout.
    """
    folder = Path(folder)
    config = read_config(folder)
    model = build_from_config(cls, config, source=str(folder / "config.json"))
    weights = find_weights_file(folder)
    state_dict = load_state_dict_file(weights)
    check_state_dict(model, state_dict, str(weights))
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.to(device=device or "cpu", dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    logger.debug("Loaded %s from %s", cls.__name__, weights)
    return model


def transformers_dtype_kwargs(dtype: Optional[torch.dtype]) -> dict:
    """``dtype=`` for transformers >= 4.56, ``torch_dtype=`` before."""
    if dtype is None:
        return {}
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) >= Version("4.56"):
        return {"dtype": dtype}
    return {"torch_dtype": dtype}


def load_transformers_model(cls, folder: str | os.PathLike, dtype: Optional[torch.dtype] = None,
                            device: Optional[torch.device | str] = None):
    """``cls.from_pretrained(folder)`` that fails on missing/unexpected/mismatched keys."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelFilesNotFoundError(f"'{folder / 'config.json'}' is missing.")
    try:
        model, info = cls.from_pretrained(str(folder), output_loading_info=True, **transformers_dtype_kwargs(dtype))
    except OSError as exc:
        raise ModelFilesNotFoundError(f"Could not load {cls.__name__} from '{folder}': {exc}") from exc
    problems = {k: list(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise IncompatibleCheckpointError(f"Weights in '{folder}' do not fit {cls.__name__}: {problems}.")
    model.to(device=device or "cpu")
    model.eval()
    model.requires_grad_(False)
    return model
