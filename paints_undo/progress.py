"""Progress reporting and cancellation shared by the keyframe and video stages.

The samplers call back after every step; ``RunControl`` turns that into ``ProgressEvent``s for the
caller (tqdm bars in the CLI, ``gr.Progress`` in the app) and raises ``Cancelled`` as soon as the
caller's cancel flag is set, so a run stops between two sampler steps and loses nothing else.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Union

from .errors import Cancelled


@dataclass(frozen=True)
class ProgressEvent:
    """``step`` of ``total`` done in ``stage`` ('keyframes' or 'video'); segments count from 0.

    ``together`` lists the segments sampled as one batch with ``segment`` (the first of them), if any.
    """

    stage: str
    step: int
    total: int
    segment: Optional[int] = None
    segments: Optional[int] = None
    together: tuple[int, ...] = ()

    @property
    def description(self) -> str:
        if self.segment is None:
            return f"Generating key frames ({self.step}/{self.total})"
        if len(self.together) > 1:
            which = ", ".join(str(i + 1) for i in self.together)
            return f"Generating videos ({which} of {self.segments} together): step {self.step}/{self.total}"
        return f"Generating videos ({self.segment + 1}/{self.segments}): step {self.step}/{self.total}"


ProgressCallback = Callable[[ProgressEvent], None]
CancelFlag = Union[threading.Event, Callable[[], bool], None]


def _silent(iterable: Iterable) -> Iterable:
    return iterable


class RunControl:
    """Reports progress and checks the cancel flag for one run."""

    def __init__(self, progress: Optional[ProgressCallback] = None, cancel: CancelFlag = None):
        self.progress = progress
        self.cancel = cancel

    @property
    def cancelled(self) -> bool:
        if self.cancel is None:
            return False
        if isinstance(self.cancel, threading.Event):
            return self.cancel.is_set()
        return bool(self.cancel())

    def check(self) -> None:
        """Raise ``Cancelled`` if the caller asked to stop."""
        if self.cancelled:
            raise Cancelled("Stopped by the user.")

    def report(self, event: ProgressEvent) -> None:
        if self.progress is not None:
            self.progress(event)

    def sampler_callback(self, stage: str, total: int, segment: Optional[int] = None,
                         segments: Optional[int] = None, together: tuple[int, ...] = ()) -> Callable[[dict], None]:
        """A sampler ``callback``: one progress event per finished step, then the cancel check."""

        def callback(info: dict) -> None:
            self.report(ProgressEvent(stage, int(info["i"]) + 1, total, segment, segments, together))
            self.check()

        return callback

    #: Samplers take a tqdm-like wrapper for their step loop; progress goes through callbacks instead.
    progress_tqdm = staticmethod(_silent)
