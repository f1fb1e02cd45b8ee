"""Where a module's weights live: one definition for every model and helper of this package."""

from __future__ import annotations

import torch
from torch import nn


def module_device(module: nn.Module) -> torch.device:
    """Device of ``module``'s parameters (models move as a whole; the first parameter speaks for all)."""
    return next(module.parameters()).device


def module_dtype(module: nn.Module) -> torch.dtype:
    """Dtype of ``module``'s parameters."""
    return next(module.parameters()).dtype


class DeviceDtypeMixin:
    """``.device`` / ``.dtype`` properties, as diffusers models have them (callers rely on both)."""

    @property
    def device(self) -> torch.device:
        return module_device(self)

    @property
    def dtype(self) -> torch.dtype:
        return module_dtype(self)
