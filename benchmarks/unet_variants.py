"""Speed of one video-UNet step per implementation variant, at the default job's shape.

The video UNet is about 90 % of the default job, so its step time decides the whole. This script
builds it at full size (``configs/full.json``, random weights, fp16), feeds it the shape of one
batched-CFG sampler step (2 x 16 frames of 56x48 latents, text and image context) and times
variants of the same math against each other, with the max abs difference of each output from
the first (reference) variant's:

* ``reference``: PyTorch's group-norm kernel for the clip-wide norms, one matrix product per
  feed-forward gate (the original's kernels);
* ``clip-norm``: clip-wide group norms through ``ClipGroupNorm``'s multi-block reductions;
* ``default``: that plus the feed-forward gates as two contiguous products (``GEGLU.split``);
* ``default+channels-last``: the default with activations and convolution weights channels-last
  (``UNet3DModel.set_channels_last``): no cuDNN layout transposes around the convolutions;
* ``default+cuda-graph``: the default replayed through ``CUDAGraphRunner`` (opt-in ``--cuda-graphs``);
* ``compile`` / ``compile+cuda-graph``: ``torch.compile`` of the default (``--compile``; minutes);
* ``compile-regional``: ``torch.compile`` of each residual block and transformer separately
  (``--compile-regional``): blocks of one class and shape reuse one compiled graph, so the warm-up
  is shorter, at the cost of fusions across block boundaries;
* ``default+channels-last+cuda-graph``: channels-last replayed through a CUDA graph;
* ``default+channels-last+fused`` (``--fused``): channels-last with the group norms (and the SiLU
  after them) and the feed-forward gates as one-pass Triton kernels (``UNet3DModel.set_fused_kernels``);
* ``default+channels-last+conv2d`` (``--temporal-conv-2d``): channels-last with the temporal 3x1x1
  convolutions run as 3x1 2D ones (``UNet3DModel.set_temporal_conv_2d``); with ``--fused`` too, also
  ``default+channels-last+fused+conv2d``;
* ``default xK`` / ``default+channels-last xK`` (``--segment-batch K,...``): K video segments per step
  (batch 2K), as ``--segment-batch`` samples them; ``ms_per_segment`` is comparable to the
  one-segment step time (with ``--fused`` / ``--temporal-conv-2d``, each of their variants too).

``--quick`` skips the variants already measured in earlier runs (the original's kernels, clip norms
alone, CUDA graphs, channels-first segment batches) and makes ``default`` the reference.

``--profile`` prints the kernels that take the most GPU time (``torch.profiler``). Results go to
``--out`` as JSON. CUDA only; ``--tiny`` runs the tiny config on CPU as a smoke test.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

logger = logging.getLogger("unet_variants")


def build_unet(tiny: bool, device: torch.device, dtype: torch.dtype):
    from diffusers_vdm import UNet3DModel

    config = json.loads((HERE / "configs" / ("tiny.json" if tiny else "full.json")).read_text())["mf_unet"]
    with torch.device(device):
        unet = UNet3DModel(**config)
    # Random values everywhere (the checkpoint has no zeros where the initialiser puts them).
    with torch.no_grad():
        for p in unet.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    return unet.to(dtype=dtype).eval().requires_grad_(False), config


def make_inputs(config: dict, device: torch.device, dtype: torch.dtype, tiny: bool,
                clips: int = 1) -> dict[str, Any]:
    """One batched-CFG step's inputs for ``clips`` video segments (batch ``2 * clips``)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    b, t = 2 * clips, int(config["temporal_length"] or 16)
    h, w = (8, 8) if tiny else (56, 48)
    d = config["context_dim"]

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    return dict(
        x=rnd(b, 4, t, h, w),
        timesteps=torch.full((b,), 500.0, device=device),
        context_text=rnd(b, 77, d),
        context_img=rnd(b, t, 16, d),
        concat_cond=rnd(b, config["in_channels"] - 4, t, h, w),
        fs=torch.full((b,), 24, device=device),
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], device: torch.device, iters: int, warmup: int = 3) -> tuple[float, list[float]]:
    """Median milliseconds of ``fn`` (device events on CUDA)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), times


def top_kernels(fn: Callable[[], Any], device: torch.device, rows: int = 18) -> list[dict[str, Any]]:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    sync(device)
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key, 0) > 0]
    events.sort(key=lambda e: -getattr(e, key))
    total = sum(getattr(e, key) for e in events)
    out = []
    for e in events[:rows]:
        out.append(dict(name=e.key[:90], ms=round(getattr(e, key) / 1e3, 3), calls=e.count,
                        share=round(getattr(e, key) / max(total, 1), 4)))
    logger.info("total profiled %s time %.1f ms", "GPU" if device.type == "cuda" else "CPU", total / 1e3)
    for row in out:
        logger.info("  %7.2f ms %5.1f%% %5d  %s", row["ms"], 100 * row["share"], row["calls"], row["name"])
    return out


def regional_blocks(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The UNet's repeated blocks (residual blocks and both kinds of transformer), outermost only."""
    from diffusers_vdm.attention import SpatialTransformer, TemporalTransformer
    from diffusers_vdm.unet import ResBlock

    kinds = (ResBlock, SpatialTransformer, TemporalTransformer)
    return [m for m in unet.modules() if isinstance(m, kinds)]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny config on CPU (smoke test)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before each variant's timed ones")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the default variant")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode (default: inductor default)")
    parser.add_argument("--compile-regional", action="store_true",
                        help="also time torch.compile of each repeated block instead of the whole UNet "
                             "(blocks of one class and shape share compiled code: a shorter warm-up)")
    parser.add_argument("--profile", action="store_true", help="print the top GPU kernels of the reference and default variants")
    parser.add_argument("--segment-batch", type=lambda v: [int(n) for n in v.split(",") if int(n) > 1], default=[],
                        help="comma list: also time the default and channels-last UNet with this many segments "
                             "per step")
    parser.add_argument("--quick", action="store_true",
                        help="skip the original's kernels, clip norms alone, CUDA graphs and channels-first "
                             "segment batches (measured before)")
    parser.add_argument("--fused", action="store_true",
                        help="also time the channels-last UNet with the fused Triton kernels (needs Triton; on "
                             "the CPU, Triton's interpreter: TRITON_INTERPRET=1)")
    parser.add_argument("--temporal-conv-2d", action="store_true",
                        help="also time the channels-last UNet with its 3x1x1 temporal convolutions as 3x1 2D "
                             "ones (with --fused: each alone and both together)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = False
    from diffusers_vdm.cuda_graphs import CUDAGraphRunner

    unet, config = build_unet(args.tiny, device, dtype)
    inputs = make_inputs(config, device, dtype, args.tiny)
    report: dict[str, Any] = dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__, cudnn=torch.backends.cudnn.version(), dtype=str(dtype),
        shape=dict(batch=2, frames=int(inputs["x"].shape[2]), latent_hw=list(inputs["x"].shape[3:])),
        variants={},
    )

    def write_report() -> None:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1))

    @torch.inference_mode()
    def step() -> torch.Tensor:
        return unet(**inputs)

    reference: Optional[torch.Tensor] = None

    def measure(name: str, fn: Callable[[], torch.Tensor], **extra) -> float:
        nonlocal reference
        ms, times = time_ms(fn, device, args.iters, warmup=args.warmup)
        out = fn().float()
        if reference is None:
            reference = out.clone()
        diff = (out - reference).abs().max().item()
        report["variants"][name] = dict(ms=round(ms, 3), times=[round(t, 3) for t in times],
                                        max_abs_diff=diff, finite=bool(torch.isfinite(out).all()), **extra)
        logger.info("%-28s %8.2f ms/step   max|diff| %.3g", name, ms, diff)
        write_report()  # what was measured survives a later timeout
        return ms

    def measure_and_profile(name: str, profile_key: str) -> None:
        measure(name, step)
        if args.profile:
            report[profile_key] = top_kernels(step, device)

    if not args.quick:
        unet.set_fast_clip_norm(False)
        unet.set_split_geglu(False)
        measure_and_profile("reference", "profile_reference")
        unet.set_fast_clip_norm(True)
        measure("clip-norm", step)
        unet.set_split_geglu(True)
    measure_and_profile("default", "profile_default")
    unet.set_channels_last(True)
    measure_and_profile("default+channels-last", "profile_channels_last")
    # Opt-in switches on top of channels-last, alone and together: (name suffix, switch) pairs.
    options: list[tuple[str, Callable[[bool], None]]] = []
    if args.fused:
        from diffusers_vdm import fused_kernels

        if fused_kernels.usable(inputs["x"]):
            options.append(("+fused", unet.set_fused_kernels))
        else:
            report["variants"]["fused_error"] = "Triton cannot run here (no Triton, or no CUDA GPU and no interpreter)"
            logger.warning("%s", report["variants"]["fused_error"])
    if args.temporal_conv_2d:
        options.append(("+conv2d", unet.set_temporal_conv_2d))
    combos = [[o for i, o in enumerate(options) if mask >> i & 1] for mask in range(1, 1 << len(options))]

    def switch(combo, enabled: bool) -> None:
        for _, set_option in combo:
            set_option(enabled)

    for combo in combos:
        switch(combo, True)
        suffix = "".join(name for name, _ in combo)
        measure_and_profile(f"default+channels-last{suffix}", f"profile_channels_last{suffix.replace('+', '_')}")
        switch(combo, False)
    layouts = [(False, []), (True, [])][1 if args.quick else 0:] + [(True, combo) for combo in combos]
    unet.set_channels_last(False)

    for clips in args.segment_batch:
        more = make_inputs(config, device, dtype, args.tiny, clips=clips)
        # The first segment's inputs are the one-segment step's, so the outputs must agree.
        batch_inputs = {k: torch.cat([v, more[k][v.shape[0]:]]) for k, v in inputs.items()}
        del more

        @torch.inference_mode()
        def batch_step() -> torch.Tensor:
            return unet(**batch_inputs)[:2]  # the first segment's, compared with the one-segment step

        for layout, combo in layouts:
            unet.set_channels_last(layout)
            switch(combo, True)
            name = f"default{'+channels-last' if layout else ''}{''.join(n for n, _ in combo)} x{clips}"
            ms = measure(name, batch_step, segments=clips)
            report["variants"][name]["ms_per_segment"] = round(ms / clips, 3)
            write_report()
            switch(combo, False)
        unet.set_channels_last(False)
        del batch_inputs, batch_step

    def through_graph(module: torch.nn.Module) -> Callable[[], torch.Tensor]:
        runner = CUDAGraphRunner(module)

        @torch.inference_mode()
        def call() -> torch.Tensor:
            return runner(**inputs)

        call()
        if runner.disabled_reason:
            report["variants"]["cuda_graph_error"] = runner.disabled_reason
        return call

    if device.type == "cuda" and not args.quick:
        measure("default+cuda-graph", through_graph(unet))
    if device.type == "cuda":  # the channels-last kernels are many and small: without launch gaps?
        unet.set_channels_last(True)
        measure("default+channels-last+cuda-graph", through_graph(unet))
        unet.set_channels_last(False)

    if args.compile_regional:
        blocks = regional_blocks(unet)
        t0 = time.perf_counter()
        for block in blocks:
            block.compile(mode=args.compile_mode)
        step()
        sync(device)
        warmup_s = time.perf_counter() - t0
        logger.info("regional compile warm-up %.1f s (%d blocks)", warmup_s, len(blocks))
        measure(f"compile-regional({args.compile_mode or 'default'})", step, warmup_s=round(warmup_s, 1),
                blocks=len(blocks))
        for block in blocks:  # back to eager before the whole-UNet variant
            block._compiled_call_impl = None

    if args.compile:
        t0 = time.perf_counter()
        unet.compile(mode=args.compile_mode)
        step()
        sync(device)
        warmup_s = time.perf_counter() - t0
        logger.info("compile warm-up %.1f s", warmup_s)
        measure(f"compile({args.compile_mode or 'default'})", step, warmup_s=round(warmup_s, 1))
        if device.type == "cuda":
            measure(f"compile({args.compile_mode or 'default'})+cuda-graph", through_graph(unet))

    write_report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
