"""Run-time guards shared by the stages."""

from __future__ import annotations

import contextlib
import gc
import logging
from typing import Iterator

import torch

from .errors import OutOfMemory

logger = logging.getLogger(__name__)

_OOM_TYPES: tuple[type[BaseException], ...] = tuple(
    t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)) if t
)


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, _OOM_TYPES) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


@contextlib.contextmanager
def out_of_memory_guard(models) -> Iterator[None]:
    """Turn a device out-of-memory error into ``OutOfMemory`` after freeing what the run held."""
    try:
        yield
    except BaseException as exc:
        if not is_out_of_memory(exc):
            raise
        logger.warning("Out of memory: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        with contextlib.suppress(Exception):
            models.unload_all()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise OutOfMemory(
            "The device ran out of memory; try the low-VRAM mode (--low-vram), fewer operation steps, "
            "or a smaller image size."
        ) from exc
