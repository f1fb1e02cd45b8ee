"""``benchmarks/run.py --tiny`` and ``unet_variants.py --tiny``: CI smoke runs of the benchmarks (not timed tests)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def test_tiny_benchmark_writes_the_report(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--tiny", "--modes", "high,low", "--other-modes-segments", "1",
         "--compare", "--warmup", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["tiny"] is True and report["device"]["type"] == "cpu"
    assert set(report["versions"]) >= {"torch", "diffusers", "transformers"}
    assert set(report["dtypes"]) >= {"sf_unet", "mf_unet", "sf_vae"}
    high, low = report["modes"]["high"], report["modes"]["low"]
    assert high["job"] == {"keyframes": 4, "video_frames": 45, "video_size": [112, 96], "finite": True}
    assert low["job"]["video_frames"] == 15 and low["vae_decode_frame_chunk"] == 2
    # Each mode is warmed up on its own shapes before it is timed.
    assert high["warmup_seconds"] > 0 and low["warmup_seconds"] > 0
    assert report["warmup_seconds"] == round(high["warmup_seconds"] + low["warmup_seconds"], 2)
    for stage in ("keyframes", "keyframes.sampler", "video", "video.sampler", "video.vae_decode"):
        assert high["stages"][stage]["seconds"] > 0 and high["stages"][stage]["calls"] >= 1
    # Optimised paths agree with the reference paths (fp32 on CPU: float noise only).
    assert report["compare"]["video_latents_batched_cfg_vs_two_passes_max_abs"] < 1e-3
    assert report["compare"]["vae_decode_frame_chunked_vs_whole_max_abs"] < 1e-5
    assert report["compare"]["vae_decode_low_vram_bands_vs_whole_max_abs"] < 1e-4
    assert report["compare"]["vae_decode_abs_max"] > 0.01
    assert report["compare"]["video_latents_channels_last_vs_channels_first_max_abs"] < 1e-3
    assert report["compare"]["video_latents_segment_batch_vs_one_at_a_time_max_abs"] < 1e-3
    assert report["compare"]["video_latents_app_defaults_vs_reference_max_abs"] < 1e-3
    assert low["vae_decode_band_bytes"] == 32 * 2**20
    # The fast clip-norm and split-gate kernels are CUDA-only: on the CPU both settings run the same code.
    assert report["compare"]["video_latents_fast_kernels_vs_reference_kernels_max_abs"] == 0.0
    assert high["cuda_graphs"] is False and "cuda_graph_error" not in high


def test_tiny_benchmark_mode_suffixes_for_the_opt_in_switches(tmp_path):
    """'-conv2d' and '-fused' reach the video UNet (fused: only where it can run, so not on this CPU)."""
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--tiny", "--modes", "high-conv2d-fused,high", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    modes = json.loads(out.read_text())["modes"]
    assert modes["high-conv2d-fused"]["temporal_conv_2d"] is True and modes["high"]["temporal_conv_2d"] is False
    assert modes["high-conv2d-fused"]["fused_kernels"] is False and "CUDA GPUs only" in result.stderr
    assert modes["high-conv2d-fused"]["job"]["finite"] and modes["high"]["job"]["finite"]


def test_tiny_unet_variant_timer(tmp_path):
    out = tmp_path / "variants.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/unet_variants.py", "--tiny", "--iters", "1", "--profile", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    variants = report["variants"]
    assert set(variants) == {"reference", "clip-norm", "default", "default+channels-last"}  # no CUDA: no graph
    assert all(v["ms"] > 0 and v["finite"] for v in variants.values())
    # On the CPU the fast paths are not taken: every variant is the reference computation.
    assert variants["default"]["max_abs_diff"] == 0.0 and variants["clip-norm"]["max_abs_diff"] == 0.0
    assert 0.0 <= variants["default+channels-last"]["max_abs_diff"] < 1e-4  # other CPU kernels, same math
    assert report["profile_default"] and all(row["ms"] >= 0 for row in report["profile_default"])


def test_tiny_unet_variant_timer_segment_batch(tmp_path):
    """``--segment-batch``: several segments per step give the first segment's one-step output."""
    out = tmp_path / "variants.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/unet_variants.py", "--tiny", "--iters", "1", "--quick", "--segment-batch", "2,1",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    variants = json.loads(out.read_text())["variants"]
    # --quick: the channels-first batches were measured in earlier runs.
    assert set(variants) == {"default", "default+channels-last", "default+channels-last x2"}
    for name in ("default+channels-last x2",):
        assert variants[name]["segments"] == 2
        assert variants[name]["ms_per_segment"] == pytest.approx(variants[name]["ms"] / 2, abs=1e-3)
        assert variants[name]["max_abs_diff"] < 1e-4  # the same computation per segment, batched


def test_tiny_unet_variant_timer_without_triton_records_why_fused_is_missing(tmp_path):
    """``--fused --temporal-conv-2d`` where Triton cannot run (here: the interpreter switched off, no CUDA GPU) times the
    other variants and says why the fused ones are missing. (The interpreter runs the tiny UNet in
    about 12 s per step, too slow for a smoke run; tests/test_fused_kernels.py checks that UNet.)"""
    import os

    out = tmp_path / "variants.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/unet_variants.py", "--tiny", "--iters", "1", "--warmup", "0", "--quick",
         "--fused", "--temporal-conv-2d", "--segment-batch", "2", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "0"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    variants = json.loads(out.read_text())["variants"]
    assert "Triton cannot run here" in variants.pop("fused_error")
    # The other opt-in switch is still timed, alone and with segments batched.
    assert set(variants) == {"default", "default+channels-last", "default+channels-last+conv2d",
                             "default+channels-last x2", "default+channels-last+conv2d x2"}
    assert all(v["ms"] > 0 and v["max_abs_diff"] < 1e-4 for v in variants.values())


def test_tiny_fused_check(tmp_path):
    """``fused_check.py --tiny``: the fused kernels against the PyTorch path, through Triton's interpreter."""
    import os

    from diffusers_vdm import fused_kernels

    if not fused_kernels.triton_installed():
        pytest.skip("Triton is not installed")
    out = tmp_path / "fused.json"
    command = [sys.executable, "benchmarks/fused_check.py", "--tiny", "--iters", "1", "--warmup", "0", "--out", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    cases = json.loads(out.read_text())["cases"]
    assert set(cases) == {"norm_silu", "clip_norm_silu", "geglu"}
    for case in cases.values():
        assert case["finite"] and case["abs_max"] > 0.5 and case["max_abs_diff"] < 1e-4
        assert case["pytorch_ms"] > 0 and case["fused_ms"] > 0 and case["min_bytes"] > 0
    # Where Triton cannot run, it says so and fails.
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TRITON_INTERPRET": "0"})
    assert result.returncode == 1 and "Triton cannot run here" in json.loads(out.read_text())["error"]


def _benchmark_module(name: str):
    """A script of ``benchmarks/`` imported as a module (the folder is not a package)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_recorder_credits_nested_peaks_to_the_enclosing_stages(monkeypatch):
    """Each stage resets the one peak counter; enclosing stages and the mode must still see it."""
    import torch

    run = _benchmark_module("run")
    memory = {"now": 0, "peak": 0}

    def allocate(n: int) -> None:
        memory["now"] += n
        memory["peak"] = max(memory["peak"], memory["now"])

    recorder = run.Recorder(torch.device("cpu"))
    monkeypatch.setattr(recorder, "peak_bytes", lambda: (memory["peak"], 2 * memory["peak"]))
    monkeypatch.setattr(recorder, "reset_peak", lambda: memory.update(peak=memory["now"]))
    gib = 2**30
    with recorder.measure("video"):
        allocate(3 * gib)
        with recorder.measure("video.sampler"):
            allocate(5 * gib)  # the job's peak: 8 GiB
            allocate(-5 * gib)
        with recorder.measure("video.vae_decode"):  # resets the counter to 3 GiB
            allocate(1 * gib)
            allocate(-1 * gib)
    stages = recorder.stages
    assert stages["video.sampler"].peak_allocated_gib == 8
    assert stages["video.vae_decode"].peak_allocated_gib == 4
    assert stages["video"].peak_allocated_gib == 8 and stages["video"].peak_reserved_gib == 16
    assert recorder.overall.peak_allocated_gib == 8
    assert [s.calls for s in stages.values()] == [1, 1, 1]


def _activation_memory():
    return _benchmark_module("activation_memory")


def test_live_tensor_bytes_counts_storages_once_and_frees_them():
    import torch

    tracker_cls = _activation_memory().LiveTensorBytes
    with tracker_cls() as tracker:
        a = torch.zeros(1024, dtype=torch.float32)  # 4 KiB
        view = a[:10].view(2, 5)  # shares a's storage: not counted again
        b = a + 1  # 4 KiB more
        assert tracker.live == 8192
        del a, b
        assert tracker.live == 4096  # the view keeps a's storage alive
        del view
        assert tracker.live == 0
    assert tracker.peak == 8192


def test_operator_traffic_counts_memory_bound_operators_only():
    import torch

    with _activation_memory().OperatorTraffic() as traffic:
        x = torch.ones(1024, 4)  # 16 KiB (a fill: written once)
        y = (x + 1).t()  # add reads x, writes its result; the transpose is a view
        torch.nn.functional.linear(x, torch.ones(8, 4))  # arithmetic: not memory-bound traffic
        torch.nn.functional.dropout(y, 0.5, training=False)  # returns its input
    assert traffic.bytes_by_op == {"ones": 16384, "add": 2 * 16384}
    assert traffic.calls == 3  # two fills (the weight is under 4 KiB: no bytes counted) and the add


def test_operator_traffic_counts_copies_not_views_and_out_tensors_once():
    import torch

    # Under inference mode, as the counts run: ``reshape`` reaches the mode whole.
    with torch.inference_mode(), _activation_memory().OperatorTraffic() as traffic:
        x = torch.empty(64, 32, 4)  # allocation only: no traffic
        x.reshape(64, 128)  # a view
        x.transpose(0, 1).reshape(32, 256)  # must copy: read and written
        x.contiguous()  # already contiguous: nothing to do
        torch.add(x, x, out=torch.empty_like(x))  # reads x twice, writes out once
    size = 64 * 32 * 4 * 4
    assert traffic.bytes_by_op == {"reshape": 2 * size, "add": 3 * size}


def test_cuda_layouts_give_meta_results_the_gpu_layouts():
    import torch

    am = _activation_memory()
    with torch.device("meta"):
        conv = torch.nn.Conv2d(16, 16, 3, padding=1)
        x = torch.empty(2, 16, 8, 8)
        q = torch.empty(2, 8, 4, 16).transpose(1, 2)  # (b, heads, n, d) view of (b, n, heads, d)
    with torch.inference_mode(), am.CudaLayouts(), am.ConvolutionLayouts() as layouts:
        assert conv(x).is_contiguous()
        y = conv(x.contiguous(memory_format=torch.channels_last))
        attended = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    assert attended.stride() == q.stride()  # merging the heads back is a view
    assert layouts.channels_first == 1 and layouts.channels_last == 1
    # The channels-first call: input, weight and result each transposed (read + written).
    weight_bytes = 16 * 16 * 9 * 4
    assert layouts.transposed_bytes == 2 * (2 * 16 * 8 * 8 * 4) * 2 + 2 * weight_bytes + 2 * weight_bytes


def test_channels_last_unet_feeds_every_convolution_channels_last():
    """Counted on ``meta`` with cuDNN's layout rules: no convolution is left with a channels-first input."""
    am = _activation_memory()
    config = json.loads((ROOT / "benchmarks" / "configs" / "tiny.json").read_text())["mf_unet"]
    first = am.unet_step_work(config, 2, 4, 64, 64)
    last = am.unet_step_work(config, 2, 4, 64, 64, channels_last=True)
    convolutions = first["convolutions_channels_first"] + first["convolutions_channels_last"]
    assert convolutions > 10 and first["convolutions_channels_first"] == convolutions
    assert last["convolutions_channels_first"] == 0 and last["convolutions_channels_last"] == convolutions
    assert last["cudnn_transpose_gb"] < first["cudnn_transpose_gb"] / 20
    assert last["tflop"] == first["tflop"]
    # The frames <-> clips views cost no copy any more.
    assert last["memory_bound_gb_by_op"].get("reshape", 0.0) < first["memory_bound_gb_by_op"]["reshape"]


def test_fused_kernel_traffic_model_counts_every_replaced_step():
    """The traffic model behind the fused kernels' expected gain: every group norm and gate of the UNet
    is counted once, with the passes each path makes over its tensor."""
    from diffusers_vdm.attention import GEGLU
    from diffusers_vdm.normalization import GroupNorm
    from diffusers_vdm.unet import ResBlock, TemporalConvBlock

    am = _activation_memory()
    config = json.loads((ROOT / "benchmarks" / "configs" / "tiny.json").read_text())["mf_unet"]
    unet, _ = am._unet_call(config, 2, 4, 64, 64, torch.float16)
    counts = {kind: sum(isinstance(m, kind) for m in unet.modules())
              for kind in (GroupNorm, GEGLU, ResBlock, TemporalConvBlock)}
    traffic = am.fused_kernel_traffic(config, 2, 4, 64, 64)
    assert traffic["norm_calls"] == counts[GroupNorm] and traffic["gate_calls"] == counts[GEGLU]
    # Each residual block's two norms and each temporal conv block's four take their SiLU; one per block adds emb.
    assert traffic["norms_with_silu"] == 2 * counts[ResBlock] + 4 * counts[TemporalConvBlock]
    assert traffic["norms_with_emb"] == counts[ResBlock]
    # A gate: 5 passes over its output's size without the kernel, 3 with it.
    assert traffic["gate_unfused_gb"] * 3 == pytest.approx(traffic["gate_fused_gb"] * 5)
    # A norm: 4 passes (+2 for the SiLU, +2 for the emb sum) without, 3 with.
    assert traffic["norm_fused_gb"] < traffic["norm_unfused_gb"] < traffic["norm_fused_gb"] * 8 / 3
    assert traffic["saved_gb"] == pytest.approx(traffic["unfused_gb"] - traffic["fused_gb"]) and traffic["saved_gb"] > 0


def test_banded_decode_lowers_the_counted_peak():
    """On the meta device (no compute): the decoder's temporal mixing in bands with frame chunks needs
    about half the activation memory of whole clips (the full-size numbers are in benchmarks/README.md)."""
    am = _activation_memory()
    config = json.loads((ROOT / "benchmarks" / "configs" / "tiny.json").read_text())["mf_vae"]
    whole = am.decoder_peak(config, frames=16, height=96, width=112, frame_chunk=0, band_bytes=0)
    banded = am.decoder_peak(config, frames=16, height=96, width=112, frame_chunk=2, band_bytes=8192)
    assert whole > 0 and banded < 0.6 * whole


def test_activation_memory_report(tmp_path):
    out = tmp_path / "activation.json"
    result = subprocess.run([sys.executable, "benchmarks/activation_memory.py", "--tiny", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["tiny"] is True and report["frames"] == 16
    decoder = report["decoder"]
    assert len(decoder) == 4 and all(v > 0 for v in decoder.values())
    steps = report["unet_step"]
    both, one = steps["both guidance branches (high, normal)"], steps["one branch at a time (low)"]
    assert 0 < one < both
    work = report["unet_step_work"]
    assert work["tflop"] > 0 and work["memory_bound_gb"] > 0
    assert report["unet_step_work_channels_last"]["convolutions_channels_first"] == 0
    assert {"group_norm", "layer_norm", "silu"} <= set(work["memory_bound_gb_by_op"])
    assert "dropout" not in work["memory_bound_gb_by_op"]  # eval-mode dropout returns its input
    keyframes = report["keyframe_decode"]
    assert 0 < keyframes["one at a time (low)"] < keyframes["all at once (high, normal)"]


def test_regional_compile_targets_each_repeated_block_once(tiny_mf_repo):
    unet_variants = _benchmark_module("unet_variants")
    from diffusers_vdm import UNet3DModel
    from diffusers_vdm.attention import SpatialTransformer, TemporalTransformer
    from diffusers_vdm.loading import load_module_folder
    from diffusers_vdm.unet import ResBlock

    import torch

    unet = load_module_folder(UNet3DModel, tiny_mf_repo / "unet", torch.float32, None)
    blocks = unet_variants.regional_blocks(unet)
    kinds = (ResBlock, SpatialTransformer, TemporalTransformer)
    assert {type(b) for b in blocks} == set(kinds)
    assert len(blocks) == sum(isinstance(m, kinds) for m in unet.modules())
    # None inside another: each piece of the UNet is compiled at most once.
    assert not any(inner is not outer and any(inner is m for m in outer.modules()) for outer in blocks for inner in blocks)
