"""Headless Paints-UNDO: the API shared by the Gradio app, the command-line tool and the tests.

Importing this package loads no model, touches no GPU and no network; models are loaded by a
``ModelManager`` on first use.
"""

from .errors import Cancelled, InvalidInputError, ModelLoadError, ModelsNotAvailableError, OutOfMemory, PaintsUndoError
from .keyframes import DEFAULT_NEGATIVE_PROMPT, DEFAULT_UNDO_STEPS, generate_keyframes
from .models import ModelManager, ModelSources, default_manager
from .progress import ProgressEvent
from .sketch import SketchResult, extract_lineart, generate_sketches, rank_candidates
from .video import DEFAULT_BUCKETS, VideoResult, VideoSegment, generate_video, iter_video_segments, parse_buckets

__all__ = [
    "Cancelled",
    "DEFAULT_BUCKETS",
    "DEFAULT_NEGATIVE_PROMPT",
    "DEFAULT_UNDO_STEPS",
    "InvalidInputError",
    "ModelLoadError",
    "ModelManager",
    "ModelSources",
    "ModelsNotAvailableError",
    "OutOfMemory",
    "PaintsUndoError",
    "ProgressEvent",
    "SketchResult",
    "VideoResult",
    "VideoSegment",
    "default_manager",
    "extract_lineart",
    "generate_keyframes",
    "generate_sketches",
    "generate_video",
    "iter_video_segments",
    "parse_buckets",
    "rank_candidates",
]
