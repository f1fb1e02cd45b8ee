"""Strict checkpoint checking shared by every loader: one place that says how a state dict misfits."""

from __future__ import annotations

from typing import Mapping, Optional

import torch


def describe_mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> Optional[str]:
    """``None`` when names and shapes match exactly, else one line naming what is wrong (first 3 of each).

    Loaders turn this into their own error: a missing or unexpected key is never just a warning.
    """
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    wrong_shape = [
        f"{k} {tuple(given[k].shape)} != {tuple(expected[k].shape)}"
        for k in expected
        if k in given and tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    parts = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong_shape)):
        if items:
            shown = ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")
            parts.append(f"{len(items)} {label} ({shown})")
    return "; ".join(parts) or None
