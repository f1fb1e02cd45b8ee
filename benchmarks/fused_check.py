"""The fused Triton kernels against the PyTorch code they replace, at the video UNet's shapes.

For each memory-bound step that ``UNet3DModel.set_fused_kernels`` fuses, this times the PyTorch
path (what runs channels-last without ``--fused-kernels``) and the fused kernels on the same input,
and reports the max abs difference of their outputs and the bytes each must move at least:

* ``norm_silu``: a residual block's group norm of ``h + emb`` then SiLU, frames ``(b t, c, h, w)``;
* ``clip_norm_silu``: a temporal conv block's group norm over whole clips ``(b, c, t, h, w)`` then SiLU;
* ``geglu``: a feed-forward gate ``value * gelu(gate)``.

Shapes are those of one batched-CFG step of the default job at the first UNet level (2 x 16
frames of 56x48 latents, 320 channels, 1280-wide gates). CUDA by default; ``--tiny`` runs small
shapes on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``) as a smoke test. JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for path in (ROOT, HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from unet_variants import time_ms  # noqa: E402

logger = logging.getLogger("fused_check")


def cases(tiny: bool, device: torch.device, dtype: torch.dtype) -> dict[str, dict[str, Any]]:
    """Each case: ``pytorch`` and ``fused`` callables over the same inputs, and its minimal traffic."""
    from diffusers_vdm.normalization import GroupNorm

    clips, frames, (height, width), channels, inner = (1, 2, (4, 6), 64, 128) if tiny else (2, 16, (56, 48), 320, 1280)
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    def norm(fused: bool) -> GroupNorm:
        module = GroupNorm(32, channels, eps=1e-5).to(device=device, dtype=dtype)
        with torch.no_grad():
            module.weight.copy_(1.0 + 0.1 * torch.randn(channels, generator=torch.Generator().manual_seed(1)))
            module.bias.copy_(0.1 * torch.randn(channels, generator=torch.Generator().manual_seed(2)))
        module.channels_last = True
        module.fused = module.applies_silu = fused
        return module

    plain, fused = norm(False), norm(True)
    frames_in = rnd(clips * frames, channels, height, width).contiguous(memory_format=torch.channels_last)
    emb = rnd(clips * frames, channels, 1, 1)
    clip_in = rnd(clips, channels, frames, height, width).contiguous(memory_format=torch.channels_last_3d)
    tokens = clips * frames * height * width
    value, gate = rnd(tokens, inner), rnd(tokens, inner, scale=2.0)
    element = torch.finfo(dtype).bits // 8
    from diffusers_vdm import fused_kernels

    return {
        "norm_silu": dict(
            pytorch=lambda: F.silu(plain(frames_in, offset=emb)),
            fused=lambda: fused(frames_in, offset=emb),
            min_bytes=3 * frames_in.numel() * element,  # read twice (statistics, then values), write once
        ),
        "clip_norm_silu": dict(
            pytorch=lambda: F.silu(plain(clip_in)),
            fused=lambda: fused(clip_in),
            min_bytes=3 * clip_in.numel() * element,
        ),
        "geglu": dict(
            pytorch=lambda: value * F.gelu(gate),
            fused=lambda: fused_kernels.gelu_gate(value, gate),
            min_bytes=3 * value.numel() * element,
        ),
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes on the CPU (Triton's interpreter)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from diffusers_vdm import fused_kernels

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    probe = torch.zeros(1, device=device)
    report: dict[str, Any] = dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__, dtype=str(dtype), cases={},
    )
    if not fused_kernels.usable(probe):
        report["error"] = "Triton cannot run here (no Triton, or no CUDA GPU and no TRITON_INTERPRET=1)"
        logger.error("%s", report["error"])
    else:
        with torch.inference_mode():
            for name, case in cases(args.tiny, device, dtype).items():
                reference, fused = case["pytorch"]().float(), case["fused"]().float()
                entry: dict[str, Any] = dict(
                    max_abs_diff=float((reference - fused).abs().max()), abs_max=float(reference.abs().max()),
                    finite=bool(torch.isfinite(fused).all()), min_bytes=case["min_bytes"],
                )
                for path in ("pytorch", "fused"):
                    fn: Callable[[], Any] = case[path]
                    ms, _ = time_ms(fn, device, args.iters, warmup=args.warmup)
                    entry[f"{path}_ms"] = round(ms, 4)
                    entry[f"{path}_gb_per_s_at_min_bytes"] = round(case["min_bytes"] / ms / 1e6, 1)
                entry["speedup"] = round(entry["pytorch_ms"] / entry["fused_ms"], 3)
                report["cases"][name] = entry
                logger.info("%-15s pytorch %8.3f ms  fused %8.3f ms  x%.2f  max|diff| %.3g (|y| <= %.3g)", name,
                            entry["pytorch_ms"], entry["fused_ms"], entry["speedup"], entry["max_abs_diff"],
                            entry["abs_max"])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    return 0 if "error" not in report else 1


if __name__ == "__main__":
    sys.exit(main())
