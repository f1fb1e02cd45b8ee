"""Speed and memory of the whole Paints-UNDO job, stage by stage, per VRAM mode.

Builds every component at full size from configs equal to the official ones (``configs/full.json``)
with random weights -- a network's speed does not depend on its weight values -- and runs the
default job through the production API (``paints_undo.generate_keyframes`` / ``generate_video``):
6 keyframes at 512x640 with 50 steps, then 7 video segments of 16 frames at the chosen bucket with
50 steps and CFG. Writes JSON with seconds and peak memory per stage and mode, the device, dtypes,
settings and library versions, plus a check that the optimised paths match the reference paths.

    python benchmarks/run.py                      # full size on the best device, modes high,normal,low
    python benchmarks/run.py --tiny               # tiny configs on CPU in seconds (CI smoke test)
    python benchmarks/run.py --modes high --out results.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import logging
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

logger = logging.getLogger("benchmark")

#: Dense compute of the default job counted on the real model sizes (issue 7), and its H100 floor.
DEFAULT_JOB_PFLOP = 10.2
H100_FLOOR_SECONDS = 13.0


# -- building the models --------------------------------------------------------------------------


def load_configs(tiny: bool) -> dict[str, dict]:
    return json.loads((HERE / "configs" / ("tiny.json" if tiny else "full.json")).read_text())


def _build(factory: Callable[[], torch.nn.Module], device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Construct directly on ``device`` (fast random init), cast, eval."""
    with torch.device(device):
        module = factory()
    return module.to(dtype=dtype).eval().requires_grad_(False)


def build_models(manager, configs: dict[str, dict], device: torch.device) -> None:
    """Random-weight components at the configs' sizes, installed into ``manager``'s model cache."""
    from diffusers import AutoencoderKL
    from diffusers.models.attention_processor import AttnProcessor2_0
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig

    from diffusers_vdm import (
        ImprovedCLIPVisionModelWithProjection,
        LatentVideoDiffusionPipeline,
        Resampler,
        UNet3DModel,
        VideoAutoencoderKL,
    )
    from paints_undo.models import ModelOrigin, MultiFrameModels, SingleFrameModels
    from single_frame import KDiffusionSampler, ModifiedUNet

    memory = manager.memory
    dt = memory.dtype_for
    origin = ModelOrigin(repo="random-weights", folder="(benchmark)")

    unet = _build(lambda: ModifiedUNet.from_config(configs["sf_unet"]), device, dt("sf_unet"))
    vae = _build(lambda: AutoencoderKL.from_config(configs["sf_vae"]), device, dt("sf_vae"))
    text = _build(lambda: CLIPTextModel(CLIPTextConfig(**configs["sf_text_encoder"])), device, dt("sf_text_encoder"))
    unet.set_attn_processor(AttnProcessor2_0())
    vae.set_attn_processor(AttnProcessor2_0())
    if manager.compile:
        unet.compile()
    sampler = KDiffusionSampler(unet, timesteps=1000, linear_start=0.00085, linear_end=0.020, linear=True,
                                batched_cfg=manager.use_batch_cfg)
    manager._single = SingleFrameModels(CLIPTokenizer.from_pretrained(str(HERE / "tokenizers" / "single_frame")),
                                        text, vae, unet, sampler, origin)

    pipe = LatentVideoDiffusionPipeline(
        tokenizer=CLIPTokenizer.from_pretrained(str(HERE / "tokenizers" / "multi_frame")),
        text_encoder=_build(lambda: CLIPTextModel(CLIPTextConfig(**configs["mf_text_encoder"])), device,
                            dt("mf_text_encoder")),
        image_encoder=_build(lambda: ImprovedCLIPVisionModelWithProjection(
            CLIPVisionConfig(**configs["mf_image_encoder"])), device, dt("mf_image_encoder")),
        vae=_build(lambda: VideoAutoencoderKL(**configs["mf_vae"]), device, dt("mf_vae")),
        image_projection=_build(lambda: Resampler(**configs["mf_image_projection"]), device,
                                dt("mf_image_projection")),
        unet=_build(lambda: UNet3DModel(**configs["mf_unet"]), device, dt("mf_unet")),
    )
    manager.apply_memory_settings(pipe)
    if manager.compile:
        pipe.unet.compile()
    manager._multi = MultiFrameModels(pipe, origin)


def with_mode(shared, mode: str, batch_cfg: Optional[bool] = None, cuda_graphs: bool = False,
              channels_last: Optional[bool] = None, segment_batch: Optional[int] = None,
              fused_kernels: bool = False):
    """A manager in VRAM ``mode`` over the already built models of ``shared`` (built once per run)."""
    from paints_undo.models import ModelManager, SingleFrameModels
    from single_frame import KDiffusionSampler

    manager = ModelManager(device=shared.device, vram_mode=mode, compile=shared.compile, batch_cfg=batch_cfg,
                           cuda_graphs=cuda_graphs, channels_last=channels_last, segment_batch=segment_batch,
                           fused_kernels=fused_kernels)
    sf = shared._single
    sampler = KDiffusionSampler(sf.unet, timesteps=1000, linear_start=0.00085, linear_end=0.020, linear=True,
                                batched_cfg=manager.use_batch_cfg)
    manager._single = SingleFrameModels(sf.tokenizer, sf.text_encoder, sf.vae, sf.unet, sampler, sf.origin)
    manager._multi = shared._multi
    manager.apply_memory_settings(shared._multi.pipeline)
    return manager


def parameter_counts(manager) -> dict[str, int]:
    sf, mf = manager._single, manager._multi.pipeline
    named = dict(sf_unet=sf.unet, sf_vae=sf.vae, sf_text_encoder=sf.text_encoder, mf_unet=mf.unet, mf_vae=mf.vae,
                 mf_text_encoder=mf.text_encoder, mf_image_encoder=mf.image_encoder,
                 mf_image_projection=mf.image_projection)
    return {k: sum(p.numel() for p in m.parameters()) for k, m in named.items()}


# -- measuring -------------------------------------------------------------------------------------


@dataclass
class StageStats:
    seconds: float = 0.0
    calls: int = 0
    peak_allocated_gib: float = 0.0
    peak_reserved_gib: float = 0.0


@dataclass
class Recorder:
    """Times wrapped callables (with device syncs) and records the peak memory during each call.

    Stages nest (``video`` holds ``video.sampler``...). PyTorch keeps one peak counter, which each
    stage resets when it starts; so before a reset the peak so far is credited to every stage still
    open, and ``overall`` holds the peak of everything measured.
    """

    device: torch.device
    stages: dict[str, StageStats] = field(default_factory=dict)
    overall: StageStats = field(default_factory=StageStats)
    _open: list[StageStats] = field(default_factory=list)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def peak_bytes(self) -> tuple[int, int]:
        """(allocated, reserved) peak bytes since the last reset."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device), torch.cuda.max_memory_reserved(self.device)
        return 0, 0

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def credit_peak(self, stages: list[StageStats]) -> None:
        allocated, reserved = (v / 2**30 for v in self.peak_bytes())
        for stats in (*stages, self.overall):
            stats.peak_allocated_gib = max(stats.peak_allocated_gib, allocated)
            stats.peak_reserved_gib = max(stats.peak_reserved_gib, reserved)

    def wrap(self, owner: Any, name: str, stage: str) -> Callable[[], None]:
        """Instrument ``owner.name``; returns a function that restores it."""
        original = getattr(owner, name)
        recorder = self

        @functools.wraps(original)
        def timed(*args, **kwargs):
            with recorder.measure(stage):
                return original(*args, **kwargs)

        setattr(owner, name, timed)
        return lambda: setattr(owner, name, original)

    @contextlib.contextmanager
    def measure(self, stage: str):
        stats = self.stages.setdefault(stage, StageStats())
        self.sync()
        self.credit_peak(self._open)  # the enclosing stages' peak up to here, before the reset
        self.reset_peak()
        self._open.append(stats)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            stats.seconds += time.perf_counter() - start
            stats.calls += 1
            self.credit_peak(self._open)  # this stage's peak counts for the enclosing ones too
            self._open.pop()


def instrument(manager, recorder: Recorder) -> list[Callable[[], None]]:
    """Sub-stages: samplers, encoders, decoders and model moves, each timed on its own."""
    sf, pipe = manager._single, manager._multi.pipeline

    class _Sampler:  # special methods are looked up on the type, so wrap the instance in an object
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, **kwargs):
            with recorder.measure("keyframes.sampler"):
                return self.inner(**kwargs)

    original_sampler = sf.sampler
    sf.sampler = _Sampler(original_sampler)
    restores = [lambda: setattr(sf, "sampler", original_sampler)]
    restores.append(recorder.wrap(sf.vae, "encode", "keyframes.vae_encode"))
    restores.append(recorder.wrap(sf.vae, "decode", "keyframes.vae_decode"))
    restores.append(recorder.wrap(sf.text_encoder, "forward", "keyframes.text_encoder"))
    for name, stage in (("encode_cropped_prompt_77tokens", "video.text_encoder"),
                        ("encode_clip_vision", "video.clip_vision"), ("encode_latents", "video.vae_encode"),
                        ("decode_latents", "video.vae_decode")):
        restores.append(recorder.wrap(pipe, name, stage))
    restores.append(recorder.wrap(pipe.image_projection, "forward", "video.resampler"))
    original_call = type(pipe).__call__

    def timed_call(self, **kwargs):
        with recorder.measure("video.sampler"):
            return original_call(self, **kwargs)

    type(pipe).__call__ = timed_call
    restores.append(lambda: setattr(type(pipe), "__call__", original_call))
    restores.append(recorder.wrap(manager.memory, "load_models_to_gpu", "model_moves"))
    return restores


# -- the job ---------------------------------------------------------------------------------------


@dataclass
class JobSettings:
    width: int = 512
    height: int = 640
    undo_steps: tuple[int, ...] = (400, 600, 800, 900, 950, 999)
    keyframe_steps: int = 50
    video_steps: int = 50
    buckets: str = "320x512,384x448,448x384,512x320"
    cfg: float = 3.0
    video_cfg: float = 7.5
    segments: Optional[int] = None  # None = all (len(undo_steps) + 1)


def example_image() -> np.ndarray:
    from PIL import Image

    return np.array(Image.open(ROOT / "imgs" / "1.png").convert("RGB"))


def run_job(manager, settings: JobSettings, recorder: Recorder) -> dict[str, Any]:
    import paints_undo

    image = example_image()
    with recorder.measure("keyframes"):
        keyframes = paints_undo.generate_keyframes(image, "1girl, masterpiece", settings.undo_steps, settings.width,
                                                   settings.height, 12345, settings.keyframe_steps,
                                                   "lowres, bad anatomy", settings.cfg, models=manager)
    if settings.segments is not None:
        keyframes = keyframes[: settings.segments + 1]
    with recorder.measure("video"):
        result = paints_undo.generate_video(keyframes, "1girl, masterpiece, best quality", settings.video_steps,
                                            settings.video_cfg, 123, buckets=settings.buckets, models=manager)
    return {"keyframes": len(keyframes), "video_frames": int(result.frames.shape[0]),
            "video_size": list(result.frames.shape[1:3]), "finite": bool(np.isfinite(result.frames).all())}


# -- optimised vs reference paths ------------------------------------------------------------------


def compare_paths(manager, bucket: tuple[int, int], steps: int, decode_band_bytes: int) -> dict[str, float]:
    """Max |difference| between optimised and reference code paths on the same inputs and seed.

    ``decode_band_bytes``: band size for the low-VRAM decode check (the low mode's own at full size).
    """
    from diffusers_vdm import fused_kernels

    pipe = manager._multi.pipeline
    device, dtype = pipe.unet.device, pipe.unet.dtype
    h, w = bucket
    g = torch.Generator(device="cpu").manual_seed(0)
    b, t = 1, 16

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    ctx = pipe.unet.config["context_dim"]
    kw = dict(positive_text_cond=rnd(b, 77, ctx), negative_text_cond=rnd(b, 77, ctx),
              positive_image_cond=rnd(b, t, 16, ctx), negative_image_cond=rnd(b, t, 16, ctx),
              concat_cond=rnd(b, 4, t, h // 8, w // 8), fs=3)
    out: dict[str, float] = {}
    graphs_before = pipe.cuda_graphs

    def sample(batch_cfg: bool, graphs: bool, reference_kernels: bool) -> torch.Tensor:
        pipe.set_cuda_graphs(graphs)
        pipe.unet.set_fast_clip_norm(not reference_kernels)
        pipe.unet.set_split_geglu(not reference_kernels)
        try:
            latents = pipe(batch_size=1, steps=steps, guidance_scale=7.5,
                           generator=torch.Generator(device).manual_seed(1), batch_cfg=batch_cfg, **kw)
        finally:
            pipe.unet.set_fast_clip_norm(True)
            pipe.unet.set_split_geglu(True)
        return latents.float()

    def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max())

    layout_before = pipe.unet.channels_last
    pipe.unet.set_channels_last(False)  # the original's layout, unless a check says otherwise
    with torch.inference_mode():
        # Reference: the original's path (two UNet calls per step, eager, the original's kernels).
        ref = sample(batch_cfg=False, graphs=False, reference_kernels=True)
        batched = sample(batch_cfg=True, graphs=False, reference_kernels=True)
        fast_kernels = sample(batch_cfg=True, graphs=False, reference_kernels=False)
        out["video_latents_batched_cfg_vs_two_passes_max_abs"] = max_abs(ref, batched)
        out["video_latents_fast_kernels_vs_reference_kernels_max_abs"] = max_abs(batched, fast_kernels)
        # Two clips sampled as one batch (segment batching), each with its own generator, vs the first alone.
        pair = dict(kw, positive_image_cond=torch.cat([kw["positive_image_cond"], rnd(b, t, 16, ctx)]),
                    negative_image_cond=kw["negative_image_cond"].repeat(2, 1, 1, 1),
                    concat_cond=torch.cat([kw["concat_cond"], rnd(b, 4, t, h // 8, w // 8)]))
        generators = [torch.Generator(device).manual_seed(seed) for seed in (1, 2)]
        pipe.unet.set_channels_last(True)
        try:
            channels_last = sample(batch_cfg=True, graphs=False, reference_kernels=False)
            # The app's defaults on a GPU: channels-last, segments batched, both guidance branches batched.
            together = pipe(batch_size=1, steps=steps, guidance_scale=7.5, generator=generators, batch_cfg=True,
                            **pair)[:1].float()
        finally:
            pipe.unet.set_channels_last(False)
        out["video_latents_channels_last_vs_channels_first_max_abs"] = max_abs(fast_kernels, channels_last)
        out["video_latents_segment_batch_vs_one_at_a_time_max_abs"] = max_abs(channels_last, together)
        out["video_latents_app_defaults_vs_reference_max_abs"] = max_abs(ref, together)
        if device.type == "cuda" and fused_kernels.usable(kw["concat_cond"]):
            # The fused Triton kernels (opt-in) against the same channels-last path without them.
            fused_before = pipe.unet.fused_kernels
            pipe.unet.set_channels_last(True)
            pipe.unet.set_fused_kernels(True)
            try:
                fused = sample(batch_cfg=True, graphs=False, reference_kernels=False)
            finally:
                pipe.unet.set_fused_kernels(fused_before)
                pipe.unet.set_channels_last(False)
            out["video_latents_fused_kernels_vs_channels_last_max_abs"] = max_abs(channels_last, fused)
        if device.type == "cuda":
            graphed = sample(batch_cfg=True, graphs=True, reference_kernels=False)
            out["video_latents_cuda_graph_vs_eager_max_abs"] = max_abs(fast_kernels, graphed)
            out["video_latents_all_optimisations_vs_reference_max_abs"] = max_abs(ref, graphed)
        pipe.set_cuda_graphs(graphs_before)
        out["video_latents_abs_max"] = float(ref.abs().max())
        # Reference-attention chunking in the VAE decoder (low mode) vs all frames at once.
        hidden = [rnd(b, c, 2, h >> i, w >> i) for i, c in enumerate(_encoder_channels(pipe))]
        hidden.append(rnd(b, pipe.vae.config["ch"], 2, h, w))
        latents = rnd(b, 4, t, h // 8, w // 8)
        chunk_before, band_before = pipe.vae.decoder.frame_chunk, pipe.vae.decoder.band_bytes
        try:
            pipe.vae.set_decoder_frame_chunk(0)
            pipe.vae.set_decoder_band_bytes(0)
            whole = pipe.decode_latents(latents, hidden)
            pipe.vae.set_decoder_frame_chunk(4)
            chunked = pipe.decode_latents(latents, hidden)
            pipe.vae.set_decoder_frame_chunk(2)
            pipe.vae.set_decoder_band_bytes(decode_band_bytes)
            banded = pipe.decode_latents(latents, hidden)
        finally:
            pipe.vae.set_decoder_frame_chunk(chunk_before)
            pipe.vae.set_decoder_band_bytes(band_before)
        out["vae_decode_frame_chunked_vs_whole_max_abs"] = max_abs(whole.float(), chunked.float())
        out["vae_decode_low_vram_bands_vs_whole_max_abs"] = max_abs(whole.float(), banded.float())
        out["vae_decode_abs_max"] = float(whole.float().abs().max())
    pipe.unet.set_channels_last(layout_before)
    return out


def run_compare(shared, settings: JobSettings, tiny: bool) -> dict[str, float]:
    manager = with_mode(shared, "high")
    manager.memory.load_models_to_gpu(manager._multi.modules())
    bucket = tuple(int(v) for v in settings.buckets.split(",")[0].split("x"))
    try:
        # Tiny clips fit in one band: a few KiB per band makes the tiny run exercise the banded path.
        from memory_management import MemoryManager

        band_bytes = 8 * 1024 if tiny else MemoryManager(manager.memory.device, "low").vae_decode_band_bytes
        return compare_paths(manager, bucket, steps=2 if tiny else 4, decode_band_bytes=band_bytes)
    finally:
        manager.unload_all()


def _encoder_channels(pipe) -> list[int]:
    cfg = pipe.vae.config
    return [cfg["ch"] * m for m in cfg["ch_mult"]]


# -- main ------------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "numpy", "huggingface-hub"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"type": device.type, "platform": platform.platform(), "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, total_gib=round(props.total_memory / 2**30, 1),
                    capability=list(torch.cuda.get_device_capability(device)))
    return info


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny configs, few steps (CPU smoke test)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--modes", default="high,normal,low",
                        help="comma list of high/normal/low, each with the app's defaults (on a GPU: the video "
                             "UNet channels-last, in high mode all segments in as few batches as memory holds), "
                             "optionally with '-compile', '-graphs', '-nhwc' / '-nchw' (force the video UNet's "
                             "layout), '-segbatch' / '-onebyone' (force all video segments as one batch / one "
                             "at a time), '-fused' (the fused Triton kernels, --fused-kernels), '-conv2d' "
                             "(temporal convolutions as 2D ones) and/or '-twopass' (guidance branches as two UNet "
                             "calls); e.g. high-compile, low-twopass, high-nchw-onebyone (the earlier default), "
                             "high-fused-conv2d")
    parser.add_argument("--keyframe-steps", type=int, default=None)
    parser.add_argument("--video-steps", type=int, default=None)
    parser.add_argument("--segments", type=int, default=None, help="video segments to run (default: all 7)")
    parser.add_argument("--buckets", default=None)
    parser.add_argument("--size", default=None, help="keyframe WIDTHxHEIGHT (default 512x640)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNets in every mode")
    parser.add_argument("--warmup", action="store_true", help="a short untimed run before each mode (lazy init, autotuning for its shapes)")
    parser.add_argument("--no-batch-cfg", action="store_true", help="two UNet calls per step, as the original")
    parser.add_argument("--compare", action="store_true", help="also check optimised vs reference paths")
    parser.add_argument("--other-modes-segments", type=int, default=None,
                        help="video segments for the modes after the first (time scales per segment)")
    parser.add_argument("--time-budget", type=float, default=None, help="skip remaining modes after this many s")
    parser.add_argument("--out", default=str(HERE / "results" / "latest.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("paints_undo", "diffusers_vdm", "memory_management"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from memory_management import select_device
    from paints_undo.models import ModelManager

    device = select_device(args.device if args.device else ("cpu" if args.tiny else None))
    configs = load_configs(args.tiny)
    settings = JobSettings()
    if args.tiny:
        settings = JobSettings(width=128, height=128, undo_steps=(400, 999), keyframe_steps=2, video_steps=2,
                               buckets="80x128,96x112,112x96,128x80")
    if args.keyframe_steps:
        settings.keyframe_steps = args.keyframe_steps
    if args.video_steps:
        settings.video_steps = args.video_steps
    if args.segments:
        settings.segments = args.segments
    if args.buckets:
        settings.buckets = args.buckets
    if args.size:
        settings.width, settings.height = (int(v) for v in args.size.lower().split("x"))

    report: dict[str, Any] = {
        "device": device_info(device), "versions": versions(), "tiny": args.tiny,
        "settings": {**settings.__dict__, "compile": args.compile, "batch_cfg": not args.no_batch_cfg},
        "modes": {}, "default_job_pflop": DEFAULT_JOB_PFLOP, "h100_floor_seconds": H100_FLOOR_SECONDS,
    }
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    shared = ModelManager(device=str(device), vram_mode="high", compile=args.compile)
    build_start = time.perf_counter()
    build_models(shared, configs, device)
    report["build_seconds"] = round(time.perf_counter() - build_start, 2)
    report["parameters"] = parameter_counts(shared)
    report["dtypes"] = {k: str(shared.memory.dtype_for(k)).replace("torch.", "") for k in (
        "sf_unet", "sf_text_encoder", "sf_vae", "mf_unet", "mf_text_encoder", "mf_vae", "mf_image_encoder",
        "mf_image_projection")}
    shared.unload_all()  # every mode starts with the models in system memory, as the app does

    short_job = JobSettings(**{**settings.__dict__, "keyframe_steps": 2, "video_steps": 2, "segments": 1})
    report["warmup_seconds"] = 0.0

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for index, mode in enumerate(modes):
        if args.time_budget and time.perf_counter() - started > args.time_budget:
            report["modes"][mode] = {"skipped": "time budget"}
            continue
        vram_mode, *variants = mode.split("-")
        compiled = "compile" in variants
        if compiled and not shared.compile:
            shared.compile = True
            for unet in (shared._single.unet, shared._multi.pipeline.unet):
                unet.compile()
        two_passes = args.no_batch_cfg or "twopass" in variants
        layout = True if "nhwc" in variants else False if "nchw" in variants else None
        together = len(settings.undo_steps) + 1 if "segbatch" in variants else 1 if "onebyone" in variants else None
        manager = with_mode(shared, vram_mode, batch_cfg=False if two_passes else None,
                            cuda_graphs="graphs" in variants, channels_last=layout, segment_batch=together,
                            fused_kernels="fused" in variants)
        # Benchmark-only switch until timed: the temporal 3x1x1 convolutions as 3x1 2D ones.
        shared._multi.pipeline.unet.set_temporal_conv_2d("conv2d" in variants)
        mode_settings = JobSettings(**{**settings.__dict__})
        if index > 0 and args.other_modes_segments and manager.video_segment_batch == 1:
            mode_settings.segments = args.other_modes_segments
        if compiled or args.warmup:
            # Compilation, or lazy CUDA init, kernel loading and cuDNN autotuning for this mode's own
            # shapes (decode chunks and bands, one or two guidance calls), outside the timings.
            t0 = time.perf_counter()
            warmup_job = short_job
            if manager.video_segment_batch > 1:  # the batched shapes: all segments, with few steps
                warmup_job = JobSettings(**{**short_job.__dict__, "segments": mode_settings.segments})
            run_job(manager, warmup_job, Recorder(device))
            warmup_seconds = round(time.perf_counter() - t0, 2)
            report["warmup_seconds"] = round(report["warmup_seconds"] + warmup_seconds, 2)
            manager.unload_all()
        recorder = Recorder(device)
        restores = instrument(manager, recorder)
        entry: dict[str, Any] = {"batch_cfg": manager.use_batch_cfg, "segments": mode_settings.segments or "all",
                                 "compile": compiled, "cuda_graphs": manager.use_cuda_graphs,
                                 "channels_last": manager.use_channels_last,
                                 "fused_kernels": manager.use_fused_kernels,
                                 "temporal_conv_2d": shared._multi.pipeline.unet.temporal_conv_2d,
                                 "video_segment_batch": manager.video_segment_batch,
                                 "vae_decode_frame_chunk": manager.memory.vae_decode_frame_chunk,
                                 "vae_decode_band_bytes": manager.memory.vae_decode_band_bytes,
                                 "unet_attention_batch_chunk": manager.memory.unet_attention_batch_chunk}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            entry["job"] = run_job(manager, mode_settings, recorder)
        except Exception as exc:  # record and go on with the next mode
            logger.exception("mode %s failed", mode)
            entry["error"] = f"{type(exc).__name__}: {exc}"
        for restore in restores:
            restore()
        entry["stages"] = {k: {f: round(v, 3) if isinstance(v, float) else v for f, v in s.__dict__.items()}
                           for k, s in recorder.stages.items()}
        total = sum(recorder.stages[s].seconds for s in ("keyframes", "video") if s in recorder.stages)
        entry["total_seconds"] = round(total, 2)
        segments_run = entry.get("job", {}).get("keyframes", 1) - 1
        if "video" in recorder.stages and segments_run > 0:
            entry["seconds_per_segment"] = round(recorder.stages["video"].seconds / segments_run, 2)
        if mode_settings.segments is None:
            entry["ratio_to_h100_floor"] = round(total / H100_FLOOR_SECONDS, 2)
        if device.type == "cuda":
            recorder.credit_peak([])  # anything after the last stage too
            entry["peak_allocated_gib"] = round(recorder.overall.peak_allocated_gib, 2)
            entry["peak_reserved_gib"] = round(recorder.overall.peak_reserved_gib, 2)
        if compiled:
            entry["compile_warmup_seconds"] = warmup_seconds
        elif args.warmup:
            entry["warmup_seconds"] = warmup_seconds
        runner = shared._multi.pipeline._graph_runner
        if manager.use_cuda_graphs and runner is not None and runner.disabled_reason:
            entry["cuda_graph_error"] = runner.disabled_reason
        report["modes"][mode] = entry
        logger.info("mode %s: %s", mode, json.dumps({k: v for k, v in entry.items() if k != "stages"}))
        if args.compare and "compare" not in report and not compiled:
            report["compare"] = run_compare(shared, settings, args.tiny)
        manager.unload_all()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        out_path.write_text(json.dumps(report, indent=2) + "\n")  # partial results survive a later failure

    out_path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({m: {k: e.get(k) for k in ("total_seconds", "peak_allocated_gib", "error")}
                      for m, e in report["modes"].items()}, indent=1))
    return 0 if all("error" not in e for e in report["modes"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
