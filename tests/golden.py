"""Helpers for the golden test vectors in ``tests/fixtures/golden``.

The golden vectors come from running the original Paints-UNDO code on tiny models whose weights
are a pure function of (key name, shape, seed) -- the ``derived-v1`` scheme described in
``tests/fixtures/golden/README.md``. ``materialize_repo`` rebuilds such a repository on disk in the
official layout so that the production loading code can load it like a downloaded checkpoint.
"""

from __future__ import annotations

import json
import math
import shutil
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = FIXTURES / "golden"
REFERENCE = FIXTURES / "reference"
TINY_REPOS = GOLDEN / "tiny_repos"


def derive_tensor(key: str, shape: tuple[int, ...] | list[int], seed: int, dtype: str = "float32") -> torch.Tensor:
    """One derived-v1 tensor; depends only on (key, shape, seed)."""
    shape = tuple(shape)
    if dtype == "int64":
        return torch.zeros(shape, dtype=torch.int64)
    g = torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + zlib.crc32(key.encode("utf-8"))) % 2**63)
    x = torch.randn(shape, generator=g, dtype=torch.float32)
    if len(shape) >= 2:
        return x / math.sqrt(math.prod(shape[1:]))
    if len(shape) == 1 and (key.endswith(".weight") or key.endswith(".running_var")):
        return 1.0 + 0.1 * x
    return 0.1 * x


def derive_state_dict(keys: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Derived weights for a ``{name: {"shape": [...], "dtype": ...}}`` (or ``{name: shape}``) layout."""
    out = {}
    for k, v in keys.items():
        if isinstance(v, dict):
            out[k] = derive_tensor(k, v["shape"], seed, v.get("dtype", "float32")).contiguous()
        else:
            out[k] = derive_tensor(k, v, seed).contiguous()
    return out


def materialize_repo(name: str, out_dir: Path) -> Path:
    """Copy a tiny repo (configs, tokenizer, manifest) and write its derived weights files."""
    src = TINY_REPOS / name
    out_dir = Path(out_dir)
    shutil.copytree(src, out_dir)
    manifest = json.loads((src / "weights_manifest.json").read_text())
    assert manifest["scheme"] == "derived-v1"
    for f in manifest["files"]:
        sd = derive_state_dict(f["tensors"], manifest["seed"])
        path = out_dir / f["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(path), metadata={"format": "pt"})
    return out_dir


def load_case(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(case.json, tensors)`` of one golden case."""
    case_dir = GOLDEN / name
    case = json.loads((case_dir / "case.json").read_text())
    tensors_path = case_dir / "tensors.safetensors"
    tensors = load_file(str(tensors_path)) if tensors_path.exists() else {}
    return case, tensors


def reference_keys(component: str) -> dict[str, list[int]]:
    """Full-size state-dict layout ``{name: shape}`` of one component."""
    data = json.loads((REFERENCE / "keys" / f"{component}.json").read_text())
    return {k: (v["shape"] if isinstance(v, dict) else v) for k, v in data["keys"].items()}


def reference_config(component: str) -> dict[str, Any]:
    """Believed full-size constructor kwargs of one component."""
    return json.loads((REFERENCE / "configs" / f"{component}.json").read_text())["kwargs"]


#: (case/output name, max abs error, tolerance text) of every golden comparison in this session,
#: written to ``test-artifacts/golden_report.md`` and summarised at the end of the run.
REPORT: list[tuple[str, float, str]] = []


def record(name: str, err: float, tolerance: str) -> None:
    REPORT.append((name, float(err), tolerance))


def max_abs_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    return (got.double() - expected.double()).abs().max().item()


def assert_close(got: torch.Tensor, expected: torch.Tensor, tol: dict, name: str = "") -> float:
    """``torch.allclose`` with the case's tolerance; returns the max abs error for reports."""
    got = got.detach().float().cpu()
    expected = expected.float()
    assert got.shape == expected.shape, f"{name}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    err = max_abs_err(got, expected)
    ok = torch.allclose(got, expected, rtol=tol["rtol"], atol=tol["atol"])
    if name:
        record(name, err, f"rtol={tol['rtol']} atol={tol['atol']}")
    assert ok, f"{name}: max abs err {err:.3g} outside rtol={tol['rtol']} atol={tol['atol']}"
    return err
