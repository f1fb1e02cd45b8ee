"""Device, dtype and offloading policy: the one place that decides where models live.

Nothing here runs at import time: the device is chosen on first use (CUDA, then Apple MPS, then
CPU), so importing this module never initialises CUDA. The decision is logged once.

Offloading follows the original's semantics: ``load_models_to_gpu(models)`` makes exactly
``models`` resident on the compute device and, unless high-VRAM mode is on, moves every other
model it put there back to the CPU; ``unload_all_models(extra)`` moves everything back.
Three VRAM modes (see ``VRAM_MODES``) are picked automatically from free memory or by flag.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Iterable

import torch

logger = logging.getLogger(__name__)

GiB = 1024**3
MiB = 1024**2

#: ``high``: every model stays resident; ``normal``: one stage resident (the original's policy);
#: ``low``: like normal plus sub-model offload, chunked decodes and sliced attention.
VRAM_MODES = ("high", "normal", "low")

#: Free-memory thresholds used by ``decide_vram_mode`` when no mode is forced.
HIGH_VRAM_MIN_FREE = 22 * GiB
NORMAL_VRAM_MIN_FREE = 10 * GiB
#: In ``low`` mode both guidance branches still run as one batch when this much is free: with the
#: video UNet alone resident, a batched sampler step peaks at about 5.1 GiB reserved (measured in
#: ``normal`` mode, whose sampler stage is the same), so 8 GB cards keep the faster single call and
#: smaller cards run the branches one after the other (4.1 GiB).
LOW_VRAM_BATCH_CFG_MIN_FREE = 7 * GiB
#: High mode's peak for the default job with one video segment at a time (17.5 GiB reserved, 14.0 GiB
#: allocated, at the video decode; H100, 2026-11-26 "run 4" of ``benchmarks/``), and what each further
#: segment sampled in the same batch adds: the sampler's peak went from 10.9 to 24.3 GiB reserved
#: (1.7 GiB allocated per segment) with all 7 segments in one batch, i.e. 2.2 GiB per segment.
HIGH_VRAM_JOB_PEAK = 18 * GiB
SEGMENT_BATCH_EXTRA = int(2.25 * GiB)

# Runtime dtypes of the original on CUDA. Keys are component roles used across the project.
_CUDA_DTYPES = {
    "sf_unet": torch.float16,
    "sf_text_encoder": torch.float16,
    "sf_vae": torch.bfloat16,  # the original keeps the single-frame VAE in bf16
    "mf_unet": torch.float16,
    "mf_text_encoder": torch.float16,
    "mf_vae": torch.float16,
    "mf_image_encoder": torch.float16,
    "mf_image_projection": torch.float16,
    "lineart": torch.float32,
}


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def select_device(preferred: str | torch.device | None = None) -> torch.device:
    """The compute device: ``preferred`` (or ``$PAINTS_UNDO_DEVICE``), else CUDA, MPS, CPU.

    Raises ``ValueError`` with one actionable sentence when the preferred device is unusable.
    """
    preferred = preferred if preferred is not None else os.environ.get("PAINTS_UNDO_DEVICE") or None
    if preferred is not None:
        device = torch.device(preferred)
        if device.type == "cuda" and not _cuda_available():
            raise ValueError(f"Device '{preferred}' was requested but no CUDA GPU is available; use --device cpu.")
        if device.type == "mps" and not _mps_available():
            raise ValueError(f"Device '{preferred}' was requested but Apple MPS is not available; use --device cpu.")
        return device
    if _cuda_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def supports_dtype(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``dtype`` is a sensible compute dtype on ``device``."""
    if device.type == "cpu":
        return dtype == torch.float32
    if device.type == "mps":
        return dtype in (torch.float32, torch.float16)
    if device.type == "cuda" and dtype == torch.float16:
        major, _ = torch.cuda.get_device_capability(device)
        return major >= 6
    if device.type == "cuda" and dtype == torch.bfloat16:
        return torch.cuda.is_bf16_supported()
    return True


def dtype_for(component: str, device: torch.device) -> torch.dtype:
    """Compute dtype of one component on ``device``.

    CUDA: the original's dtypes (UNets and encoders fp16, the single-frame VAE bf16); bf16 where
    fp16 is unsupported (and vice versa). CPU: fp32 (half precision on CPU is slow and inexact).
    """
    device = torch.device(device)
    if device.type == "cpu":
        return torch.float32
    wanted = _CUDA_DTYPES.get(component, torch.float16)
    if device.type == "mps":
        return torch.float32 if wanted == torch.float32 else torch.float16
    if supports_dtype(device, wanted):
        return wanted
    for fallback in (torch.bfloat16, torch.float16):
        if supports_dtype(device, fallback):
            return fallback
    return torch.float32


def flash_attention_available(device: torch.device) -> bool:
    """Whether SDPA can use flash / memory-efficient kernels (no full score matrix in memory)."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def configure_backends(device: torch.device) -> None:
    """Per-process kernel choices for ``device``: cuDNN autotuning (the shapes repeat every step)."""
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = True


def free_memory(device: torch.device) -> int:
    """Free bytes usable on ``device`` (driver free memory plus what torch holds in its cache)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        reserved = torch.cuda.memory_reserved(device)
        allocated = torch.cuda.memory_allocated(device)
        return int(free + (reserved - allocated))
    if device.type == "mps":
        recommended = getattr(torch.mps, "recommended_max_memory", None)
        if recommended is not None:
            return int(recommended() - torch.mps.current_allocated_memory())
        return 8 * GiB
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # pragma: no cover - psutil is a gradio dependency, normally present
        return 16 * GiB


def decide_vram_mode(device: torch.device, forced: str | None = None) -> str:
    """``forced`` if given, else ``high``/``normal``/``low`` from the free memory of ``device``."""
    if forced is not None:
        if forced not in VRAM_MODES:
            raise ValueError(f"Unknown VRAM mode '{forced}'; choose one of {', '.join(VRAM_MODES)}.")
        return forced
    device = torch.device(device)
    if device.type == "cpu":
        # Models already live in system memory: moving them around only costs time.
        return "high"
    free = free_memory(device)
    if free >= HIGH_VRAM_MIN_FREE:
        return "high"
    if free >= NORMAL_VRAM_MIN_FREE:
        return "normal"
    return "low"


@dataclass
class MemoryManager:
    """Moves models between the CPU and the compute device according to a VRAM mode.

    One instance per pipeline owner (app, CLI, test); it holds the only mutable residency state.
    """

    device: torch.device
    vram_mode: str = "normal"
    offload_device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: Free bytes on the device when the manager was created (0 when unknown).
    free_at_start: int = 0
    _resident: list = field(default_factory=list)
    _lock: threading.RLock = field(default_factory=threading.RLock)

    @classmethod
    def create(cls, device: str | torch.device | None = None, vram_mode: str | None = None) -> "MemoryManager":
        dev = select_device(device)
        if dev.type == "cuda":
            # Before the first allocation: growable segments keep reserved memory close to allocated
            # memory when stages of very different shapes follow each other (less fragmentation).
            os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        configure_backends(dev)
        mode = decide_vram_mode(dev, vram_mode)
        free = free_memory(dev)
        logger.info(
            "Compute device %s, VRAM mode '%s' (%s; %.1f GiB free)",
            dev,
            mode,
            "forced" if vram_mode else "chosen from free memory",
            free / GiB,
        )
        return cls(device=dev, vram_mode=mode, free_at_start=free)

    @property
    def high_vram(self) -> bool:
        return self.vram_mode == "high"

    def dtype_for(self, component: str) -> torch.dtype:
        return dtype_for(component, self.device)

    @property
    def batch_cfg_default(self) -> bool:
        """Run both guidance branches as one batch: faster on accelerators; in low mode only with
        ``LOW_VRAM_BATCH_CFG_MIN_FREE`` free; kept off on CPU (where the golden tests compare against the
        original's two calls)."""
        if self.device.type == "cpu":
            return False
        return self.vram_mode != "low" or self.free_at_start >= LOW_VRAM_BATCH_CFG_MIN_FREE

    #: Frames per call of the video VAE decoder's per-frame layers (0 = all at once).
    @property
    def vae_decode_frame_chunk(self) -> int:
        return {"low": 2, "normal": 4}.get(self.vram_mode, 0)

    #: Largest band of rows (bytes) for the video VAE decoder's temporal mixing (0 = whole clips).
    #: With the frame chunks this takes the decoder's activations at the default size (16 frames at
    #: 448x384) from 4.0 GiB to 2.5 GiB (normal) and 2.3 GiB (low), counted by
    #: ``benchmarks/activation_memory.py``; the video UNet's sampler then has the job's peak.
    @property
    def vae_decode_band_bytes(self) -> int:
        return {"low": 32 * MiB, "normal": 64 * MiB}.get(self.vram_mode, 0)

    #: Decode keyframes one at a time in low mode: the single-frame VAE decoder's activations scale with
    #: the batch (6 keyframes at 512x640 in bf16: 2.8 GiB at once, 0.5 GiB one by one, counted by
    #: ``benchmarks/activation_memory.py``), but on an H100 the six calls took 0.58 s instead of 0.13 s
    #: (run 2), which normal mode, where the batch fits, need not pay.
    @property
    def keyframe_decode_one_at_a_time(self) -> bool:
        return self.vram_mode == "low"

    #: Keep the video UNet and VAE on the device together while segments are sampled and decoded,
    #: so that neither moves out and back in for every segment (model moves took 1.5 s per segment
    #: in normal mode, run 2 of ``benchmarks/``). Normal mode has the room: the VAE's weights are
    #: 0.19 GiB, and a banded decode beside the UNet (2.7 GiB + about 3 GiB) stays near the batched
    #: sampler's 4.6 GiB. Low mode, whose budget is 6 GiB, gives each stage the device to itself.
    @property
    def video_unet_and_vae_together(self) -> bool:
        return self.vram_mode != "low"

    #: Where per-segment conditions wait between their encoding and their segment's decode (the VAE
    #: encoder features, 236 MiB per segment at the default size): on the device in high mode, in
    #: system memory otherwise.
    @property
    def condition_device(self) -> torch.device:
        return self.device if self.high_vram else self.offload_device

    def video_segment_batch(self, requested: int | None = None) -> int:
        """Video segments to sample as one batch; ``requested`` caps it (``None``: as many as fit).

        Only in high mode, and on a GPU only as many as the free memory at start-up holds: each
        further segment adds ``SEGMENT_BATCH_EXTRA`` to the job's peak, which the normal and low
        modes' budgets do not have. Batches are faster per segment (one video-UNet step for 7
        segments took 100.6 ms per segment against 115.7 ms for one, H100, channels-last), so a GPU
        in high mode batches by default; the CPU gains nothing and samples one at a time unless asked.
        """
        if not self.high_vram:
            return 1
        if self.device.type == "cpu":
            return 1 if requested is None else max(1, int(requested))
        room = 1 + max(0, self.free_at_start - HIGH_VRAM_JOB_PEAK) // SEGMENT_BATCH_EXTRA
        return room if requested is None else min(max(1, int(requested)), room)

    @property
    def video_unet_channels_last(self) -> bool:
        """Run the video UNet channels-last by default on CUDA GPUs from Volta on, whose cuDNN
        convolutions work channels-last: one step took 115.7 ms against 127.5 ms channels-first on an
        H100 (same math, fp16 noise apart), and 100.6 against 110.5 ms per segment with 7 segments per
        step. Older GPUs, the CPU and MPS keep PyTorch's default layout."""
        if self.device.type != "cuda":
            return False
        major, _ = torch.cuda.get_device_capability(self.device)
        return major >= 7

    def fused_kernels_unavailable_reason(self) -> str:
        """Why the opt-in fused Triton kernels cannot run on this device ('' when they can): they need
        Triton and a CUDA GPU from Ampere on (Triton's own floor for these kernels' instructions)."""
        from diffusers_vdm import fused_kernels

        if self.device.type != "cuda":
            return f"they run on CUDA GPUs only, and this run uses the {self.device.type.upper()}"
        major, minor = torch.cuda.get_device_capability(self.device)
        if major < 8:
            return f"they need a GPU of compute capability 8.0 or newer (Ampere on); this one is {major}.{minor}"
        if not fused_kernels.triton_installed():
            return "they need Triton (pip install triton)"
        return ""

    #: Batch entries per attention call in the video UNet (0 = all); only where flash kernels are missing.
    @property
    def unet_attention_batch_chunk(self) -> int:
        return 4 if self.vram_mode == "low" and not flash_attention_available(self.device) else 0

    @property
    def resident_models(self) -> list:
        return list(self._resident)

    def load_models_to_gpu(self, models: torch.nn.Module | Iterable[torch.nn.Module]) -> None:
        """Make ``models`` resident on the compute device; offload the others unless high-VRAM."""
        if isinstance(models, torch.nn.Module):
            models = [models]
        wanted = _unique(models)
        with self._lock:
            if not self.high_vram:
                for m in self._resident:
                    if not any(m is w for w in wanted):
                        m.to(self.offload_device)
                        logger.debug("Unloaded %s to %s", type(m).__name__, self.offload_device)
                self._resident = [m for m in self._resident if any(m is w for w in wanted)]
            for m in wanted:
                if not any(m is r for r in self._resident):
                    m.to(self.device)
                    self._resident.append(m)
                    logger.debug("Loaded %s to %s", type(m).__name__, self.device)
        self.empty_cache()

    def unload_all_models(self, extra_models: torch.nn.Module | Iterable[torch.nn.Module] | None = None) -> None:
        """Move every resident model (and ``extra_models``) back to the CPU."""
        if extra_models is None:
            extra_models = []
        if isinstance(extra_models, torch.nn.Module):
            extra_models = [extra_models]
        with self._lock:
            for m in _unique(list(self._resident) + list(extra_models)):
                m.to(self.offload_device)
            self._resident = []
        self.empty_cache()

    def empty_cache(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        elif self.device.type == "mps":
            with contextlib.suppress(Exception):
                torch.mps.empty_cache()


def _unique(models: Iterable[torch.nn.Module]) -> list[torch.nn.Module]:
    out: list[torch.nn.Module] = []
    for m in models:
        if not any(m is o for o in out):
            out.append(m)
    return out
