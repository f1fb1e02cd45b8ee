"""Errors users can cause or meet. Each message is one actionable sentence for the UI and the CLI."""

from __future__ import annotations


class PaintsUndoError(Exception):
    """Base class of the errors this package raises on purpose."""


class InvalidInputError(PaintsUndoError, ValueError):
    """A setting or input the user gave cannot be used."""


class ModelsNotAvailableError(PaintsUndoError, RuntimeError):
    """Model files are missing or cannot be downloaded; the message says how to provide them."""


class ModelLoadError(PaintsUndoError, RuntimeError):
    """Model files exist but do not load (corrupt or incompatible checkpoint)."""


class Cancelled(PaintsUndoError):
    """The run was stopped by the user between two sampler steps."""


class OutOfMemory(PaintsUndoError, RuntimeError):
    """The device ran out of memory; the message suggests a lower-memory setting."""
