"""Peak activation memory of the VAE decodes and of one video-UNet step, without a GPU.

The full-size models are built on PyTorch's ``meta`` device: every operator computes only the
shapes of its outputs, so a whole decode at the default job's size (16 frames at 448x384) takes a
second on any machine. :class:`LiveTensorBytes` watches every tensor the operators create and
counts the bytes of storage alive at each moment; the peak is the largest amount of activation
memory the computation needs at once.

What this leaves out, compared with ``torch.cuda.max_memory_allocated`` in ``run.py``: the weights
and the inputs (allocated before the call), the caching allocator's rounding and fragmentation, and
kernel workspaces (cuDNN's). It is a device-independent floor of a stage's peak, for comparing
settings with each other and for reasoning about a GPU run, not a replacement for one.

    python benchmarks/activation_memory.py                # full size, every VRAM mode's settings
    python benchmarks/activation_memory.py --tiny --out activation_memory.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import weakref
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

logger = logging.getLogger("activation_memory")

GiB = 1024**3


class LiveTensorBytes(TorchDispatchMode):
    """Counts the storage bytes of tensors created inside the mode that are still alive.

    Views share their base's storage and are counted once; a storage stops counting when its last
    tensor is freed. ``peak`` is the most that was alive at once, ``live`` what is alive now.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: dict[int, int] = {}

    def _release(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._tracked.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if not isinstance(value, torch.Tensor):
                continue
            storage = value.untyped_storage()
            key = id(storage)
            if key in self._tracked:
                continue
            nbytes = storage.nbytes()
            self._tracked[key] = nbytes
            self.live += nbytes
            weakref.finalize(storage, self._release, key, nbytes)
        self.peak = max(self.peak, self.live)
        return out


#: Operators that only make views (no memory traffic).
_VIEW_OPS = frozenset({
    "view", "_unsafe_view", "transpose", "permute", "expand", "unsqueeze", "squeeze", "slice", "select", "t",
    "split", "split_with_sizes", "chunk", "unbind", "alias", "as_strided", "detach", "unflatten", "flatten",
    "reshape", "_reshape_alias", "movedim", "view_as", "reshape_as", "expand_as", "swapaxes", "narrow",
})
#: Operators that only allocate (no traffic).
_ALLOCATION_OPS = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "promote_types"})
#: Operators whose time is arithmetic (matrix products, convolutions, attention).
_COMPUTE_OPS = ("linear", "mm", "addmm", "bmm", "baddbmm", "conv", "convolution", "scaled_dot_product")


def _shares_storage(out: Any, source: Any) -> bool:
    """Whether every tensor ``out`` holds is a view of ``source``'s storage (no data was moved)."""
    if not isinstance(source, torch.Tensor):
        return True
    key = source.untyped_storage()._cdata
    return all(t.untyped_storage()._cdata == key for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))


class OperatorTraffic(TorchDispatchMode):
    """Bytes read and written by each memory-bound operator (elementwise, norms, copies).

    Counts every tensor argument and result of at least 4 KiB once per call, at the operator level:
    copies that kernels make internally (layout changes inside a library call) are not seen, so this
    is the traffic of an implementation that runs each PyTorch operator as one ideal kernel.
    """

    def __init__(self) -> None:
        super().__init__()
        self.bytes_by_op: dict[str, int] = {}
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        aliasing_dropout = name == "dropout" and len(args) > 2 and not args[2]  # eval: returns its input
        if (name in _VIEW_OPS and _shares_storage(out, args[0])) or aliasing_dropout \
                or any(key in name for key in _COMPUTE_OPS):
            return out  # (a ``reshape`` that had to copy is traffic, and counted)
        if name in _ALLOCATION_OPS or (out is (args[0] if args else None) and not name.endswith("_")):
            return out  # allocation only, or a conversion that had nothing to do (``contiguous``, ``to``)
        # An ``out=`` tensor is the result: counted once, as written.
        inputs = {k: v for k, v in (kwargs or {}).items() if k != "out"}
        nbytes = sum(t.numel() * t.element_size() for t in tree_flatten((args, inputs, out))[0]
                     if isinstance(t, torch.Tensor) and t.numel() * t.element_size() >= 4096)
        self.bytes_by_op[name] = self.bytes_by_op.get(name, 0) + nbytes
        self.calls += 1
        return out


_CONVOLUTION_OPS = frozenset({"conv1d", "conv2d", "conv3d", "convolution", "_convolution"})


def _is_channels_last(x: torch.Tensor) -> bool:
    from diffusers_vdm.normalization import channels_last_format

    return channels_last_format(x) is not None


class CudaLayouts(TorchDispatchMode):
    """Gives ``meta`` results the memory layouts the CUDA kernels give them.

    PyTorch's meta kernels return plainly contiguous results, but cuDNN returns a channels-last
    convolution result when the input or the weight is channels-last, and the fused attention
    kernels return their output in the query's layout (so merging heads back is a view, not a
    copy). Modes entered after it see the corrected layouts.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not isinstance(out, torch.Tensor) or out.device.type != "meta":
            return out
        if name in _CONVOLUTION_OPS and out.dim() in (4, 5):
            if _is_channels_last(args[0]) or _is_channels_last(args[1]):
                out = out.contiguous(memory_format=torch.channels_last if out.dim() == 4 else torch.channels_last_3d)
        elif name == "scaled_dot_product_attention" and out.shape == args[0].shape:
            out = torch.empty_like(args[0])
        return out


def peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak live bytes of the tensors ``fn`` creates (its result included while it is alive), with the
    layouts CUDA kernels give their results (``CudaLayouts``)."""
    with torch.inference_mode(), CudaLayouts(), LiveTensorBytes() as tracker:
        result = fn()
        del result
    return tracker.peak


# -- the two largest stages ---------------------------------------------------------------------------


def decoder_peak(vae_config: dict, frames: int, height: int, width: int, frame_chunk: int, band_bytes: int,
                 dtype: torch.dtype = torch.float16) -> int:
    """Activation peak of one clip's video-VAE decode (``height`` x ``width`` pixels), on ``meta``."""
    from diffusers_vdm import VideoAutoencoderKL

    with torch.device("meta"):
        vae = VideoAutoencoderKL(**vae_config).to(dtype).eval().requires_grad_(False)
        vae.set_decoder_frame_chunk(frame_chunk)
        vae.set_decoder_band_bytes(band_bytes)
        ch, mults = vae_config["ch"], vae_config["ch_mult"]
        h, w = height // 8, width // 8
        latents = torch.empty(frames, vae_config["z_channels"], h, w, dtype=dtype)
        # The encoder's features of the first and last frame, one per level, then the full-size one.
        scale = 2 ** (len(mults) - 1)
        reference = [torch.empty(1, ch * m, 2, h * scale >> i, w * scale >> i, dtype=dtype) for i, m in enumerate(mults)]
        reference.append(torch.empty(1, ch, 2, height, width, dtype=dtype))
        return peak_bytes(lambda: vae.decode(latents, ref_context=reference, timesteps=frames))


def keyframe_decode_peak(vae_config: dict, keyframes: int, height: int, width: int, one_at_a_time: bool,
                         dtype: torch.dtype = torch.bfloat16) -> int:
    """Activation peak of decoding ``keyframes`` single-frame latents (the original's bf16 VAE), on ``meta``."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(vae_config).eval().requires_grad_(False)
        vae = vae.to(dtype)
        latents = torch.empty(keyframes, vae_config["latent_channels"], height // 8, width // 8, dtype=dtype)
        if one_at_a_time:
            return peak_bytes(lambda: torch.cat([vae.decode(z[None]).sample for z in latents]))
        return peak_bytes(lambda: vae.decode(latents).sample)


def _unet_call(unet_config: dict, batch: int, frames: int, height: int, width: int,
               dtype: torch.dtype, channels_last: bool = False) -> tuple[torch.nn.Module, Callable[[], torch.Tensor]]:
    """The video UNet at full size on ``meta`` and one call of it (inputs included), ready to run."""
    from diffusers_vdm import UNet3DModel

    with torch.device("meta"):
        unet = UNet3DModel(**unet_config).to(dtype).eval().requires_grad_(False)
        unet.set_channels_last(channels_last)
        h, w = height // 8, width // 8
        ctx = unet_config["context_dim"]
        latent_channels = unet_config["out_channels"]
        x = torch.empty(batch, latent_channels, frames, h, w, dtype=dtype)
        concat = torch.empty(batch, unet_config["in_channels"] - latent_channels, frames, h, w, dtype=dtype)
        timesteps = torch.full((batch,), 500, dtype=torch.long)
        text = torch.empty(batch, 77, ctx, dtype=dtype)
        image = torch.empty(batch, frames, 16, ctx, dtype=dtype)
        fs = torch.full((batch,), 3, dtype=torch.long)
    return unet, lambda: unet(x, timesteps, context_text=text, context_img=image, concat_cond=concat, fs=fs)


def unet_step_peak(unet_config: dict, batch: int, frames: int, height: int, width: int,
                   dtype: torch.dtype = torch.float16, channels_last: bool = False) -> int:
    """Activation peak of one video-UNet call on ``batch`` clips (2 = both guidance branches at once)."""
    _, call = _unet_call(unet_config, batch, frames, height, width, dtype, channels_last)
    with torch.device("meta"):
        return peak_bytes(call)


class ConvolutionLayouts(TorchDispatchMode):
    """Counts convolutions by the memory layout of their operands, and the layout traffic around them.

    cuDNN runs half-precision convolutions on recent GPUs channels-last. When neither the input nor
    the weight is channels-last, the input and weight are transposed before the kernel and the
    result back after it (``nchwToNhwcKernel`` and its inverse in a profile); when only one of them
    is, the other one is transposed. ``transposed_bytes`` is the bytes those copies read and write:
    an estimate of what the layout costs, not a measurement.
    """

    def __init__(self) -> None:
        super().__init__()
        self.channels_first = 0
        self.channels_last = 0
        self.transposed_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in _CONVOLUTION_OPS:
            x, weight = args[0], args[1]
            size = lambda t: 2 * t.numel() * t.element_size()  # noqa: E731 - read + write
            x_last, weight_last = _is_channels_last(x), _is_channels_last(weight)
            if x_last or weight_last:
                self.channels_last += 1
                self.transposed_bytes += (0 if x_last else size(x)) + (0 if weight_last else size(weight))
            else:
                self.channels_first += 1
                self.transposed_bytes += size(x) + size(weight) + size(out)
        return out


def unet_step_work(unet_config: dict, batch: int, frames: int, height: int, width: int,
                   dtype: torch.dtype = torch.float16, channels_last: bool = False) -> dict[str, Any]:
    """Arithmetic (FLOPs), memory-bound traffic and convolution layouts of one video-UNet call:
    the floors of its time."""
    from torch.utils.flop_counter import FlopCounterMode

    _, call = _unet_call(unet_config, batch, frames, height, width, dtype, channels_last)
    flops, traffic, layouts = FlopCounterMode(display=False), OperatorTraffic(), ConvolutionLayouts()
    # The layouts are corrected above the FLOP counter, which runs attention as its math decomposition.
    with torch.device("meta"), torch.inference_mode(), flops, CudaLayouts(), traffic, layouts:
        call()
    by_op = dict(sorted(traffic.bytes_by_op.items(), key=lambda kv: -kv[1]))
    return {"tflop": flops.get_total_flops() / 1e12, "memory_bound_gb": sum(by_op.values()) / 1e9,
            "memory_bound_calls": traffic.calls, "memory_bound_gb_by_op": {k: v / 1e9 for k, v in by_op.items()},
            "convolutions_channels_first": layouts.channels_first, "convolutions_channels_last": layouts.channels_last,
            "cudnn_transpose_gb": layouts.transposed_bytes / 1e9}


def fused_kernel_traffic(unet_config: dict, batch: int, frames: int, height: int, width: int,
                         dtype: torch.dtype = torch.float16) -> dict[str, Any]:
    """Activation traffic (bytes read plus written, GB) of the steps ``--fused-kernels`` replaces, in one
    channels-last video-UNet call, without and with the fused kernels.

    A model of what each path must move, counted per call from the tensors' sizes (not operator by
    operator). Without: a group norm reads its input twice for its statistics (two column
    reductions) and once more to write its result; the SiLU after it reads and writes that again; a
    residual block's ``h + emb`` before its norm reads ``h`` and writes the sum; a gate reads
    ``gate`` and writes ``gelu(gate)``, then reads both and writes the product. With: a norm reads
    once for its statistics and once to write (SiLU and ``emb`` included; the temporal transformers'
    norms, which write another layout, keep PyTorch's apply, also one read and one write); a gate
    reads both halves and writes once.
    """
    from diffusers_vdm.attention import GEGLU
    from diffusers_vdm.normalization import GroupNorm

    unet, call = _unet_call(unet_config, batch, frames, height, width, dtype, channels_last=True)
    unet.set_fused_kernels(True)  # which norms take their SiLU; on meta the PyTorch path runs all the same
    totals = {"norm_calls": 0, "norms_with_silu": 0, "norms_with_emb": 0, "gate_calls": 0,
              "norm_unfused": 0, "norm_fused": 0, "gate_unfused": 0, "gate_fused": 0}

    def on_norm(module: GroupNorm, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        size = args[0].numel() * args[0].element_size()
        emb = kwargs.get("offset") is not None
        totals["norm_calls"] += 1
        totals["norms_with_silu"] += module.applies_silu
        totals["norms_with_emb"] += emb
        totals["norm_unfused"] += size * (2 * emb + 4 + 2 * module.applies_silu)
        totals["norm_fused"] += size * 3

    def on_gate(module: GEGLU, args: tuple, out: torch.Tensor) -> None:
        size = out.numel() * out.element_size()
        totals["gate_calls"] += 1
        totals["gate_unfused"] += size * 5
        totals["gate_fused"] += size * 3

    handles = [m.register_forward_hook(on_norm, with_kwargs=True) for m in unet.modules() if isinstance(m, GroupNorm)]
    handles += [m.register_forward_hook(on_gate) for m in unet.modules() if isinstance(m, GEGLU)]
    try:
        with torch.device("meta"), torch.inference_mode():
            call()
    finally:
        for handle in handles:
            handle.remove()
    gb = {key: totals.pop(key) / 1e9 for key in ("norm_unfused", "norm_fused", "gate_unfused", "gate_fused")}
    unfused, fused = gb["norm_unfused"] + gb["gate_unfused"], gb["norm_fused"] + gb["gate_fused"]
    return {**totals, **{f"{k}_gb": v for k, v in gb.items()}, "unfused_gb": unfused, "fused_gb": fused,
            "saved_gb": unfused - fused}


def measure(configs: dict[str, dict], frames: int, height: int, width: int) -> dict[str, Any]:
    from memory_management import MemoryManager

    report: dict[str, Any] = {"frames": frames, "size": [width, height], "dtypes": {"decoder": "float16", "unet_step": "float16", "keyframe_decode": "bfloat16"}, "decoder": {},
                              "unet_step": {}, "keyframe_decode": {}}
    report["decoder"]["whole clips (reference)"] = decoder_peak(configs["mf_vae"], frames, height, width, 0, 0) / GiB
    for mode in ("high", "normal", "low"):
        memory = MemoryManager(device=torch.device("cpu"), vram_mode=mode)
        chunk, band = memory.vae_decode_frame_chunk, memory.vae_decode_band_bytes
        peak = decoder_peak(configs["mf_vae"], frames, height, width, chunk, band)
        report["decoder"][f"{mode} (frame chunk {chunk}, bands {band // 2**20} MiB)"] = peak / GiB
    for label, batch in (("both guidance branches (high, normal)", 2), ("one branch at a time (low)", 1)):
        report["unet_step"][label] = unet_step_peak(configs["mf_unet"], batch, frames, height, width) / GiB
    report["unet_step"]["both guidance branches, channels-last"] = unet_step_peak(
        configs["mf_unet"], 2, frames, height, width, channels_last=True) / GiB
    report["unet_step"]["both branches of 7 segments sampled together (high, --segment-batch 7)"] = unet_step_peak(
        configs["mf_unet"], 14, frames, height, width) / GiB
    report["unet_step_work"] = unet_step_work(configs["mf_unet"], 2, frames, height, width)
    report["unet_step_work_channels_last"] = unet_step_work(configs["mf_unet"], 2, frames, height, width,
                                                            channels_last=True)
    report["unet_step_fused_kernel_traffic"] = fused_kernel_traffic(configs["mf_unet"], 2, frames, height, width)
    # The default job's keyframe stage: 6 keyframes at 512x640 (bf16, as the original), scaled with --tiny.
    kf_height, kf_width = (640, 512) if height >= 256 else (height, width)
    for label, one in (("all at once (high, normal)", False), ("one at a time (low)", True)):
        peak = keyframe_decode_peak(configs["sf_vae"], 6, kf_height, kf_width, one)
        report["keyframe_decode"][label] = peak / GiB
    return report


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny configs and a small clip (CI smoke test)")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", default="448x384", help="WIDTHxHEIGHT of the decoded frames")
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its dtype advice on casting concerns loading weights, not this count

    configs = json.loads((HERE / "configs" / ("tiny.json" if args.tiny else "full.json")).read_text())
    width, height = (int(v) for v in args.size.lower().split("x"))
    if args.tiny:
        width, height = 112, 96
    report = measure(configs, args.frames, height, width)
    report["tiny"] = args.tiny
    report["torch"] = torch.__version__
    for stage in ("decoder", "unet_step", "keyframe_decode"):
        for label, gib in report[stage].items():
            logger.info("%-15s %-42s %.3f GiB", stage, label, gib)
    for key, label in (("unet_step_work", "channels-first"), ("unet_step_work_channels_last", "channels-last")):
        work = report[key]
        logger.info("video-UNet step (both branches, %s): %.1f TFLOP; memory-bound operators move %.1f GB in %d "
                    "calls; %d of %d convolutions take channels-first input (%.1f GB of cuDNN transposes)",
                    label, work["tflop"], work["memory_bound_gb"], work["memory_bound_calls"],
                    work["convolutions_channels_first"],
                    work["convolutions_channels_first"] + work["convolutions_channels_last"], work["cudnn_transpose_gb"])
    fused = report["unet_step_fused_kernel_traffic"]
    logger.info("video-UNet step (both branches, channels-last): the steps --fused-kernels replaces move %.1f GB "
                "(%d group norms, %d gates); fused, %.1f GB", fused["unfused_gb"], fused["norm_calls"],
                fused["gate_calls"], fused["fused_gb"])
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
