"""The three line-art detectors: RGB uint8 picture in, uint8 line map out (255 = paper, 0 = ink).

Each detector reproduces the pre- and post-processing of the public detectors exactly (see
``tests/fixtures/golden/README_lineart.md``) and is split into ``prepare`` (picture at network size),
``infer`` (raw network output) and ``postprocess`` (uint8 line map) so every stage can be checked.

Weights are resolved and loaded on first use (``__call__`` or ``load()``), never in ``__init__``; the
compute device is chosen then too (``memory_management.select_device``), so constructing a detector reads
no file and does not touch CUDA. ``unload()`` parks the weights on the CPU; the next call moves them back.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from typing import ClassVar

import cv2
import numpy as np
import torch
from torch import nn

from memory_management import dtype_for, select_device

from .anime2sketch import Anime2SketchUNet
from .informative_drawings import InformativeDrawingsGenerator
from .loading import load_network, read_state_dict, resolve_weights
from .manga_line import MangaLineNet
from .preprocessing import (
    SKETCH_MIN_SIDE,
    anime_network_size,
    manga_network_size,
    sketch_output_size,
    to_rgb_uint8,
)

logger = logging.getLogger(__name__)

_CPU = torch.device("cpu")


class _LazyDetector:
    """Owns the networks of one detector: lazy loading, device placement and offloading.

    Subclasses set ``_networks``: checkpoint file name -> zero-argument factory of the matching module.
    """

    _networks: ClassVar[Mapping[str, Callable[[], nn.Module]]] = {}

    def __init__(self, model_dir: str | os.PathLike | None = None, device: str | torch.device | None = None) -> None:
        self.model_dir = model_dir
        self._requested_device = device
        self._device: torch.device | None = None
        self._loaded: dict[str, nn.Module] = {}
        self._lock = threading.RLock()

    # ----------------------------------------------------------------- device & weights
    @property
    def device(self) -> torch.device:
        """Compute device (resolved on first access, not in ``__init__``)."""
        if self._device is None:
            self._device = select_device(self._requested_device)
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype: float32 (the detectors' precision; fp16 would shift uint8 outputs)."""
        return dtype_for("lineart", self.device)

    def network(self, filename: str) -> nn.Module:
        """The network of ``filename``, loaded if needed and resident on the compute device."""
        with self._lock:
            net = self._loaded.get(filename)
            if net is None:
                net = self._load_one(filename)
                self._loaded[filename] = net
            return net.to(device=self.device, dtype=self.dtype)

    def _load_one(self, filename: str) -> nn.Module:
        if filename not in self._networks:
            raise ValueError(f"{type(self).__name__} has no checkpoint named {filename}.")
        path = resolve_weights(filename, self.model_dir)
        state_dict = read_state_dict(path)
        with torch.device("meta"):
            net = self._networks[filename]()
        load_network(net, state_dict, source=str(path))
        net.eval().requires_grad_(False)
        logger.info("Loaded %s (%s) from %s", type(net).__name__, filename, path)
        return net

    def load(self) -> "_LazyDetector":
        """Load every checkpoint of this detector now (otherwise this happens on first call)."""
        for filename in self._networks:
            self.network(filename)
        return self

    @property
    def is_loaded(self) -> bool:
        return bool(self._loaded)

    def to(self, device: str | torch.device) -> "_LazyDetector":
        """Make ``device`` the compute device and move already loaded weights there."""
        with self._lock:
            self._device = select_device(device)
            for name, net in self._loaded.items():
                self._loaded[name] = net.to(device=self._device, dtype=self.dtype)
        return self

    def unload(self) -> None:
        """Park loaded weights on the CPU to free accelerator memory; the next call moves them back."""
        with self._lock:
            for net in self._loaded.values():
                net.to(_CPU)
        if self._device is not None and self._device.type == "cuda":
            torch.cuda.empty_cache()

    def release(self) -> None:
        """Forget the weights entirely; the next call loads them from disk again."""
        with self._lock:
            self._loaded.clear()

    def _to_tensor(self, array: np.ndarray) -> torch.Tensor:
        if not array.flags.writeable:
            array = array.copy()
        return torch.from_numpy(np.ascontiguousarray(array)).to(device=self.device, dtype=self.dtype)


class LineartDetector(_LazyDetector):
    """Informative-drawings line art: ``sk_model.pth`` (fine, default) or ``sk_model2.pth`` (``coarse=True``).

    The output is ``4*ceil(H/4) x 4*ceil(W/4)``, not cropped back to the input size (as in the original).
    Pictures with a side under 8 pixels (which the original cannot process) are edge-padded to 8 pixels
    and the output is cropped to that same rule's size.
    """

    FINE = "sk_model.pth"
    COARSE = "sk_model2.pth"
    _networks = {
        FINE: lambda: InformativeDrawingsGenerator(3, 1, base_channels=64, num_res_blocks=3, sigmoid=True),
        COARSE: lambda: InformativeDrawingsGenerator(3, 1, base_channels=64, num_res_blocks=3, sigmoid=True),
    }

    @property
    def model(self) -> nn.Module:
        return self.network(self.FINE)

    @property
    def model_coarse(self) -> nn.Module:
        return self.network(self.COARSE)

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """RGB uint8 network input: the picture itself (no resize), edge-padded only when tiny."""
        rgb = to_rgb_uint8(image)
        h, w = rgb.shape[:2]
        pad_h, pad_w = max(0, SKETCH_MIN_SIDE - h), max(0, SKETCH_MIN_SIDE - w)
        if pad_h or pad_w:
            rgb = np.pad(rgb, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        return rgb

    @torch.inference_mode()
    def infer(self, prepared: np.ndarray, coarse: bool = False) -> torch.Tensor:
        """Raw sigmoid output ``[1, 1, H', W']`` (float32, CPU) of the fine or coarse network."""
        net = self.network(self.COARSE if coarse else self.FINE)
        x = (self._to_tensor(prepared) / 255.0).permute(2, 0, 1).unsqueeze(0)
        return net(x).float().cpu()

    @staticmethod
    def postprocess(raw: torch.Tensor, input_hw: tuple[int, int]) -> np.ndarray:
        """``(line * 255).clip(0, 255)`` truncated to uint8, at ``sketch_output_size(*input_hw)``."""
        out_h, out_w = sketch_output_size(*input_hw)
        line = raw[0, 0].numpy()[:out_h, :out_w]
        return np.ascontiguousarray((line * 255.0).clip(0, 255).astype(np.uint8))

    def __call__(self, image: np.ndarray, coarse: bool = False) -> np.ndarray:
        rgb = to_rgb_uint8(image)
        return self.postprocess(self.infer(self.prepare(rgb), coarse=coarse), rgb.shape[:2])


class LineartAnimeDetector(_LazyDetector):
    """Anime2Sketch line art (``netG.pth``): stretch to multiples of 256, run, stretch back to ``H x W``."""

    CHECKPOINT = "netG.pth"
    _networks = {CHECKPOINT: lambda: Anime2SketchUNet(3, 1, num_downs=8, base_channels=64)}

    @property
    def model(self) -> nn.Module:
        return self.network(self.CHECKPOINT)

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """RGB uint8 picture cubic-resized to ``anime_network_size`` (a stretch, not padding)."""
        rgb = to_rgb_uint8(image)
        hn, wn = anime_network_size(*rgb.shape[:2])
        return cv2.resize(rgb, (wn, hn), interpolation=cv2.INTER_CUBIC)

    @torch.inference_mode()
    def infer(self, prepared: np.ndarray) -> torch.Tensor:
        """Raw tanh output ``[1, 1, Hn, Wn]`` (float32, CPU)."""
        x = (self._to_tensor(prepared) / 127.5 - 1.0).permute(2, 0, 1).unsqueeze(0)
        return self.model(x).float().cpu()

    @staticmethod
    def postprocess(raw: torch.Tensor, input_hw: tuple[int, int]) -> np.ndarray:
        """Map tanh to 0..255, cubic-resize the FLOAT map back to ``input_hw``, then clip and truncate."""
        h, w = input_hw
        line = (raw[0, 0] * 127.5 + 127.5).numpy()
        line = cv2.resize(line, (w, h), interpolation=cv2.INTER_CUBIC)
        return np.ascontiguousarray(line.clip(0, 255).astype(np.uint8))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        rgb = to_rgb_uint8(image)
        return self.postprocess(self.infer(self.prepare(rgb)), rgb.shape[:2])


class MangaLineExtraction(_LazyDetector):
    """Manga line extraction (``erika.pth``) on the gray picture; output stays at the network size.

    The network size (``manga_network_size``) caps the picture at 1280*1280 pixels and rounds each side up
    to a multiple of 16 by stretching; the output is NOT resized back (as in the original).
    """

    CHECKPOINT = "erika.pth"
    _networks = {CHECKPOINT: lambda: MangaLineNet()}

    @property
    def model(self) -> nn.Module:
        return self.network(self.CHECKPOINT)

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """Gray uint8 network input: bilinear resize of the RGB picture, THEN RGB -> gray."""
        rgb = to_rgb_uint8(image)
        h, w = manga_network_size(*rgb.shape[:2])
        resized = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR)
        return cv2.cvtColor(resized, cv2.COLOR_RGB2GRAY)

    @torch.inference_mode()
    def infer(self, prepared: np.ndarray) -> torch.Tensor:
        """Raw output ``[1, 1, h, w]`` (float32, CPU) for the gray input taken as 0..255 (no normalisation)."""
        x = self._to_tensor(prepared)[None, None]
        return self.model(x).float().cpu()

    @staticmethod
    def postprocess(raw: torch.Tensor) -> np.ndarray:
        """Clip to 0..255 and truncate to uint8."""
        return np.ascontiguousarray(raw[0, 0].numpy().clip(0, 255).astype(np.uint8))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return self.postprocess(self.infer(self.prepare(image)))
