"""Typed exceptions of the library. Only the command-line tools turn them into
one-line messages and exit codes."""

from __future__ import annotations

__all__ = [
    "KerasBnExtError",
    "ModelLoadError",
    "OutputPathError",
    "InvalidBatchNormError",
    "UnsupportedModelError",
    "InputDataError",
    "ExportError",
]


class KerasBnExtError(Exception):
    """Base class of every error this package raises on purpose."""


class ModelLoadError(KerasBnExtError):
    """A model file cannot be read: missing, not a .keras archive, broken, or unsafe."""


class OutputPathError(KerasBnExtError):
    """An output path cannot be written: it is the input, exists, or its folder is missing."""


class InvalidBatchNormError(KerasBnExtError):
    """A BatchNormalization layer holds statistics that cannot be folded (negative or
    non-finite variance, non-finite gamma/beta/mean)."""


class UnsupportedModelError(KerasBnExtError):
    """A model whose graph cannot be rebuilt (subclassed, unbuilt)."""


class InputDataError(KerasBnExtError):
    """Arrays given for verification do not fit the model's inputs."""


class ExportError(KerasBnExtError):
    """The ONNX conversion failed or produced an invalid model."""
