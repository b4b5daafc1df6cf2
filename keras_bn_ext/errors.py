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
    "VerificationError",
    "GPUUnavailableError",
    "BackendError",
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


class VerificationError(KerasBnExtError):
    """A written model cannot be checked against the original: its runtime failed, or its
    outputs differ in names or shapes (a mismatch of values is a failed report, not this)."""


class GPUUnavailableError(KerasBnExtError):
    """A GPU run was required (require_gpu=True) but onnxruntime ran on the CPU."""


class BackendError(KerasBnExtError):
    """The work needs Keras's TensorFlow backend (conversion goes through TensorFlow) but
    Keras runs on another one in this process."""


def require_tensorflow_backend(what: str) -> None:
    """Raise BackendError, naming the fix, unless Keras runs on TensorFlow."""
    import keras

    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise BackendError(
            f"{what} needs Keras's TensorFlow backend, but Keras runs on '{backend}' in this process: set "
            "KERAS_BACKEND=tensorflow before Keras is first imported (a .keras file loads on any backend), or "
            "use the command-line tools, which always run on TensorFlow"
        )
