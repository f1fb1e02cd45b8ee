"""Fused Triton kernels for the video UNet's memory-bound steps (opt-in: ``UNet3DModel.set_fused_kernels``).

On an H100 a channels-last video-UNet step spends about a third of its time in kernels that only
move memory. The largest are the group norms: with channels innermost, PyTorch has no group-norm
kernel, so ``channels_last_group_norm`` takes two column reductions for the statistics and one
broadcasting ``addcmul`` for ``x * scale + shift`` (12 ms of a 116 ms step: broadcast operands keep
PyTorch's elementwise kernels off their vectorised path), and the SiLU after it is one more pass.
The feed-forward gate ``value * gelu(gate)`` is two passes as well.

Here each of those is one pass:

* ``channel_moments``: float32 sum and sum of squares of every (sample, channel) of a ``(n, rows, c)``
  tensor, read once (partial sums per block of rows, added up by PyTorch: deterministic);
* ``scale_shift``: ``x * scale + shift`` per (sample, channel), optionally followed by SiLU, computed
  in float32 and rounded once to ``x``'s dtype;
* ``gelu_gate``: ``value * gelu(gate)`` with the exact (erf) GELU, in float32, rounded once.

The math is PyTorch's (float32 accumulation and arithmetic, as its own kernels do for half
precision); only the number of roundings to half precision differs (one instead of two), so
results differ from the unfused path by about one half-precision unit.

Triton is imported on first use, never at import time, and only where the kernels can run: CUDA
tensors, or CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``, used by the tests).
Everywhere else ``usable`` is false and callers keep their PyTorch path.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from types import SimpleNamespace
from typing import Optional

import torch

logger = logging.getLogger(__name__)

#: Programs the statistics kernel aims to launch, so that a few large samples still fill the GPU.
_TARGET_PROGRAMS = 1024
_BLOCK_C = 64  # every channel count of the video UNet (320, 640, 1280) is a multiple of 64
_STATS_BLOCK_ROWS = 64
#: Eight warps keep the two 64x64 float32 accumulators at 57 registers a thread (168 with four, which
#: would allow only three blocks per multiprocessor); read off the sm_90 build with ``cuobjdump``.
_STATS_WARPS = 8
_APPLY_BLOCK_ROWS = 32
_GATE_BLOCK = 1024


def interpreter_enabled() -> bool:
    """Whether Triton runs kernels on the CPU through its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the fused kernels can run on these tensors here (and now: not while ``torch.compile``
    traces, which fuses the PyTorch path itself and cannot trace a raw kernel launch)."""
    if torch.compiler.is_compiling() or not triton_installed():
        return False
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        return False
    device = devices.pop()
    if device.type == "cuda" or (device.type == "cpu" and interpreter_enabled()):
        return kernels_run_on(device)
    return False


@functools.cache
def kernels_run_on(device: torch.device) -> bool:
    """Whether the kernels build and run on ``device``, tried once on tiny tensors: a GPU or a Triton
    that cannot build them (or a Triton cache that cannot be written) gives the PyTorch path, with a
    warning, instead of a failed job."""
    try:
        x = torch.ones(1, _BLOCK_C, 2, 2, device=device).contiguous(memory_format=torch.channels_last)
        channel_moments(x)
        scale_shift(x, torch.ones(1, _BLOCK_C, device=device), torch.zeros(1, _BLOCK_C, device=device), silu=True)
        gelu_gate(x.flatten(), x.flatten())
    except Exception as exc:  # whatever Triton raises when it cannot build or launch
        logger.warning("The fused Triton kernels do not run on %s (%s); the PyTorch kernels run instead.",
                       device, exc)
        return False
    return True


@functools.cache
def _kernels(interpret: bool) -> SimpleNamespace:
    """The jitted kernels, built once per mode (Triton reads ``TRITON_INTERPRET`` when it decorates)."""
    import triton
    import triton.language as tl

    # Row counts vary with the image size; specialising on them would compile a variant per size.
    @triton.jit(do_not_specialize=["rows", "rows_per_split", "splits"])
    def channel_moments_kernel(
        x_ptr, sum_ptr, square_ptr, rows, channels, rows_per_split, splits,
        BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        sample = tl.program_id(0)
        split = tl.program_id(1)
        col_block = tl.program_id(2)
        cols = col_block * BLOCK_C + tl.arange(0, BLOCK_C)
        col_mask = cols < channels
        base = x_ptr + sample.to(tl.int64) * rows * channels
        first = split * rows_per_split  # rows_per_split is a multiple of BLOCK_ROWS
        total = tl.zeros([BLOCK_ROWS, BLOCK_C], dtype=tl.float32)
        total_square = tl.zeros([BLOCK_ROWS, BLOCK_C], dtype=tl.float32)
        for start in range(0, rows_per_split, BLOCK_ROWS):
            row = first + start + tl.arange(0, BLOCK_ROWS)
            mask = (row < rows)[:, None] & col_mask[None, :]
            offsets = row.to(tl.int64)[:, None] * channels + cols[None, :]
            value = tl.load(base + offsets, mask=mask, other=0.0).to(tl.float32)
            total += value
            total_square += value * value
        out = (sample.to(tl.int64) * splits + split) * channels + cols
        tl.store(sum_ptr + out, tl.sum(total, axis=0), mask=col_mask)
        tl.store(square_ptr + out, tl.sum(total_square, axis=0), mask=col_mask)

    @triton.jit(do_not_specialize=["rows"])
    def scale_shift_kernel(
        x_ptr, y_ptr, scale_ptr, shift_ptr, rows, channels,
        SILU: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        row_block = tl.program_id(0)
        col_block = tl.program_id(1)
        sample = tl.program_id(2)
        row = row_block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        cols = col_block * BLOCK_C + tl.arange(0, BLOCK_C)
        col_mask = cols < channels
        mask = (row < rows)[:, None] & col_mask[None, :]
        offsets = sample.to(tl.int64) * rows * channels + row.to(tl.int64)[:, None] * channels + cols[None, :]
        scale = tl.load(scale_ptr + sample * channels + cols, mask=col_mask, other=0.0)
        shift = tl.load(shift_ptr + sample * channels + cols, mask=col_mask, other=0.0)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        y = x * scale[None, :] + shift[None, :]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["numel"])
    def gelu_gate_kernel(value_ptr, gate_ptr, out_ptr, numel, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < numel
        value = tl.load(value_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        gelu = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))
        tl.store(out_ptr + offsets, (value * gelu).to(out_ptr.dtype.element_ty), mask=mask)

    logger.info("Fused Triton kernels ready (Triton %s%s).", triton.__version__, ", interpreter" if interpret else "")
    return SimpleNamespace(
        cdiv=triton.cdiv,
        channel_moments=channel_moments_kernel,
        scale_shift=scale_shift_kernel,
        gelu_gate=gelu_gate_kernel,
    )


def _rows_view(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``(n, c, ...)`` with channels innermost in memory, as a ``(n, rows, c)`` view (no copy)."""
    rows = x.movedim(1, -1)
    if not rows.is_contiguous():
        raise ValueError("the fused group-norm kernels need channels-last tensors (channels innermost).")
    return rows.reshape(x.shape[0], -1, x.shape[1])


def channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 sums and sums of squares, each ``(n, c)``, of a channels-last ``x`` ``(n, c, ...)``."""
    kernels = _kernels(interpreter_enabled())
    rows_view = _rows_view(x)
    n, rows, channels = rows_view.shape
    if rows_view.numel() == 0:
        zeros = torch.zeros((n, channels), dtype=torch.float32, device=x.device)
        return zeros, zeros.clone()
    col_blocks = kernels.cdiv(channels, _BLOCK_C)
    row_blocks = kernels.cdiv(rows, _STATS_BLOCK_ROWS)
    splits = max(1, min(row_blocks, kernels.cdiv(_TARGET_PROGRAMS, n * col_blocks)))
    rows_per_split = kernels.cdiv(row_blocks, splits) * _STATS_BLOCK_ROWS
    splits = kernels.cdiv(rows, rows_per_split)
    partial = torch.empty((2, n, splits, channels), dtype=torch.float32, device=x.device)
    kernels.channel_moments[(n, splits, col_blocks)](
        rows_view, partial[0], partial[1], rows, channels, rows_per_split, splits,
        BLOCK_ROWS=_STATS_BLOCK_ROWS, BLOCK_C=_BLOCK_C, num_warps=_STATS_WARPS,
    )
    sums = partial.sum(dim=2)
    return sums[0], sums[1]


def scale_shift(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, silu: bool = False,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``x * scale + shift`` (then SiLU if asked) for a channels-last ``x`` ``(n, c, ...)`` and float32
    ``scale``/``shift`` of ``(n, c)`` elements; written into ``out`` (``x``'s strides) or a new tensor."""
    kernels = _kernels(interpreter_enabled())
    rows_view = _rows_view(x)
    n, rows, channels = rows_view.shape
    if out is None:
        out = torch.empty_like(x)  # keeps the channels-last strides
    elif out.shape != x.shape or out.stride() != x.stride():
        raise ValueError("out must have x's shape and strides.")
    if rows_view.numel() == 0:
        return out
    scale = scale.to(torch.float32).reshape(n, channels).contiguous()
    shift = shift.to(torch.float32).reshape(n, channels).contiguous()
    grid = (kernels.cdiv(rows, _APPLY_BLOCK_ROWS), kernels.cdiv(channels, _BLOCK_C), n)
    kernels.scale_shift[grid](
        rows_view, _rows_view(out), scale, shift, rows, channels,
        SILU=bool(silu), BLOCK_ROWS=_APPLY_BLOCK_ROWS, BLOCK_C=_BLOCK_C,
    )
    return out


def gelu_gate(value: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``value * gelu(gate)`` (exact GELU) of two contiguous tensors of one shape and dtype."""
    if value.shape != gate.shape or value.dtype != gate.dtype:
        raise ValueError("value and gate must have one shape and dtype.")
    kernels = _kernels(interpreter_enabled())
    value, gate = value.contiguous(), gate.contiguous()
    out = torch.empty_like(value)
    numel = value.numel()
    if numel:
        kernels.gelu_gate[(kernels.cdiv(numel, _GATE_BLOCK),)](value, gate, out, numel, BLOCK=_GATE_BLOCK)
    return out
