"""Builds the fused Triton kernels for an H100 (sm_90) without a GPU, as Triton does at first launch.

Run as a script (``TRITON_INTERPRET`` off: Triton reads it on import): prints one JSON line per kernel
build, with the registers, shared memory and local (spilled) bytes a thread block uses as
``cuobjdump`` reports them when Triton's copy of it is present. Used by tests/test_fused_kernels.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("run with TRITON_INTERPRET unset or 0")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from diffusers_vdm import fused_kernels  # noqa: E402


def resource_usage(cubin: bytes) -> dict:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return {}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([str(tool), "--dump-resource-usage", str(path)], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    return {} if not found else dict(zip(("registers", "stack", "shared", "local"), map(int, found.groups())))


def main() -> int:
    kernels = fused_kernels._kernels(False)
    target = GPUTarget("cuda", 90, 32)
    builds = []
    for element in ("fp16", "bf16", "fp32"):
        builds += [
            ("channel_moments", kernels.channel_moments,
             {"x_ptr": f"*{element}", "sum_ptr": "*fp32", "square_ptr": "*fp32", "rows": "i32", "channels": "i32",
              "rows_per_split": "i32", "splits": "i32", "BLOCK_ROWS": "constexpr", "BLOCK_C": "constexpr"},
             {"BLOCK_ROWS": fused_kernels._STATS_BLOCK_ROWS, "BLOCK_C": fused_kernels._BLOCK_C},
             fused_kernels._STATS_WARPS),
            ("scale_shift", kernels.scale_shift,
             {"x_ptr": f"*{element}", "y_ptr": f"*{element}", "scale_ptr": "*fp32", "shift_ptr": "*fp32",
              "rows": "i32", "channels": "i32", "SILU": "constexpr", "BLOCK_ROWS": "constexpr", "BLOCK_C": "constexpr"},
             {"SILU": True, "BLOCK_ROWS": fused_kernels._APPLY_BLOCK_ROWS, "BLOCK_C": fused_kernels._BLOCK_C}, 4),
            ("gelu_gate", kernels.gelu_gate,
             {"value_ptr": f"*{element}", "gate_ptr": f"*{element}", "out_ptr": f"*{element}", "numel": "i64",
              "BLOCK": "constexpr"},
             {"BLOCK": fused_kernels._GATE_BLOCK}, 4),
        ]
    for name, kernel, signature, constants, warps in builds:
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants), target=target,
                                  options={"num_warps": warps})
        print(json.dumps(dict(kernel=name, dtype=signature[next(iter(signature))], warps=warps,
                              cubin_bytes=len(compiled.asm["cubin"]), **resource_usage(compiled.asm["cubin"]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
