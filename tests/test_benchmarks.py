"""``benchmarks/run.py --tiny`` and ``unet_variants.py --tiny``: CI smoke runs of the benchmarks (not timed tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_tiny_benchmark_writes_the_report(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--tiny", "--modes", "high,low", "--other-modes-segments", "1",
         "--compare", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["tiny"] is True and report["device"]["type"] == "cpu"
    assert set(report["versions"]) >= {"torch", "diffusers", "transformers"}
    assert set(report["dtypes"]) >= {"sf_unet", "mf_unet", "sf_vae"}
    high, low = report["modes"]["high"], report["modes"]["low"]
    assert high["job"] == {"keyframes": 4, "video_frames": 45, "video_size": [112, 96], "finite": True}
    assert low["job"]["video_frames"] == 15 and low["vae_decode_frame_chunk"] == 4
    for stage in ("keyframes", "keyframes.sampler", "video", "video.sampler", "video.vae_decode"):
        assert high["stages"][stage]["seconds"] > 0 and high["stages"][stage]["calls"] >= 1
    # Optimised paths agree with the reference paths (fp32 on CPU: float noise only).
    assert report["compare"]["video_latents_batched_cfg_vs_two_passes_max_abs"] < 1e-3
    assert report["compare"]["vae_decode_frame_chunked_vs_whole_max_abs"] < 1e-5
    # The fast clip-norm and split-gate kernels are CUDA-only: on the CPU both settings run the same code.
    assert report["compare"]["video_latents_fast_kernels_vs_reference_kernels_max_abs"] == 0.0
    assert high["cuda_graphs"] is False and "cuda_graph_error" not in high


def test_tiny_unet_variant_timer(tmp_path):
    out = tmp_path / "variants.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/unet_variants.py", "--tiny", "--iters", "1", "--profile", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    variants = report["variants"]
    assert set(variants) == {"reference", "clip-norm", "default"}  # no CUDA: no graph variant
    assert all(v["ms"] > 0 and v["finite"] for v in variants.values())
    # On the CPU the fast paths are not taken: every variant is the reference computation.
    assert variants["default"]["max_abs_diff"] == 0.0 and variants["clip-norm"]["max_abs_diff"] == 0.0
    assert report["profile_default"] and all(row["ms"] >= 0 for row in report["profile_default"])
