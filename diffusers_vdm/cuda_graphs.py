"""Replaying the video UNet as a CUDA graph.

One sampler step of the video UNet launches a few thousand small kernels; the 50 steps of a segment
have identical shapes. ``CUDAGraphRunner`` captures the UNet once per input signature and then
replays it, copying each call's inputs into the captured buffers. The graph runs the very same
kernels as the eager call, so results are unchanged; what goes away is the per-kernel launch cost
on the CPU and the gaps it leaves on the GPU.

The captured graph keeps its activations in a private memory pool for as long as it lives, so it is
meant for the ``high`` VRAM mode; only the latest signature is kept. Where capture fails (another
device, an operation that cannot be captured), the runner logs why once and calls the UNet directly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)


@dataclass
class _Captured:
    signature: tuple
    graph: Any  # torch.cuda.CUDAGraph
    inputs: dict[str, Any]
    output: torch.Tensor


def _signature(kwargs: dict[str, Any]) -> tuple:
    parts = []
    for name in sorted(kwargs):
        value = kwargs[name]
        if isinstance(value, torch.Tensor):
            parts.append((name, tuple(value.shape), value.dtype, value.device, value.stride()))
        elif isinstance(value, (tuple, list)):
            parts.append((name, _signature({str(i): v for i, v in enumerate(value)})))
        else:
            parts.append((name, value))
    return tuple(parts)


def _copy_into(static: Any, value: Any) -> None:
    if isinstance(static, torch.Tensor):
        static.copy_(value)
    elif isinstance(static, (tuple, list)):
        for s, v in zip(static, value):
            _copy_into(s, v)


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value)
    return value


class CUDAGraphRunner(nn.Module):
    """Calls ``module(*args, **kwargs)`` through a captured CUDA graph.

    Tensor arguments are copied into the captured buffers on every call; any other argument, a
    tensor's shape, dtype or layout, or the weights' location changing means a new capture.
    """

    def __init__(self, module: nn.Module, warmup_calls: int = 2):
        super().__init__()
        self.module = module
        self.warmup_calls = warmup_calls
        self.disabled_reason: Optional[str] = None
        self._captured: Optional[_Captured] = None

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disabled_reason is not None or (torch.is_grad_enabled() and not torch.is_inference_mode_enabled()):
            return self.module(*args, **kwargs)
        inputs = {**{f"__arg{i}": a for i, a in enumerate(args)}, **kwargs}
        signature = (_signature(inputs), self._weights_signature())
        captured = self._captured
        if captured is None or captured.signature != signature:
            self._captured = None  # free the old graph's memory pool before capturing anew
            captured = self._capture(signature, inputs)
            if captured is None:
                return self.module(*args, **kwargs)
            self._captured = captured
            return captured.output.clone()
        for name, value in inputs.items():
            _copy_into(captured.inputs[name], value)
        captured.graph.replay()
        return captured.output.clone()

    def _weights_signature(self) -> tuple:
        # A graph reads the weights where they were at capture: moving the module invalidates it.
        params = list(self.module.parameters())
        return (params[0].data_ptr(), params[-1].data_ptr(), params[0].device) if params else ()

    def _call(self, inputs: dict[str, Any]) -> torch.Tensor:
        args = [v for k, v in inputs.items() if k.startswith("__arg")]
        kwargs = {k: v for k, v in inputs.items() if not k.startswith("__arg")}
        return self.module(*args, **kwargs)

    def _capture(self, signature: tuple, inputs: dict[str, Any]) -> Optional[_Captured]:
        tensors = [v for v in inputs.values() if isinstance(v, torch.Tensor)]
        if not tensors or tensors[0].device.type != "cuda":
            self.disabled_reason = "inputs are not on a CUDA device"
            return None
        device = tensors[0].device
        static = {name: _clone(value) for name, value in inputs.items()}
        try:
            # Warm-up on a side stream (lazy initialisation and autotuning must not be captured).
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(self.warmup_calls):
                    self._call(static)
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                output = self._call(static)
        except Exception as exc:  # fall back to eager calls, loudly once
            self.disabled_reason = f"{type(exc).__name__}: {exc}"
            logger.warning("CUDA graph capture of %s failed, running it eagerly: %s",
                           type(self.module).__name__, self.disabled_reason)
            return None
        graph.replay()  # the capture itself computes nothing
        logger.info("Captured %s as a CUDA graph for inputs %s", type(self.module).__name__,
                    {k: tuple(v.shape) for k, v in inputs.items() if isinstance(v, torch.Tensor)})
        return _Captured(signature, graph, static, output)
