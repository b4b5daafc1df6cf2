"""Typed exceptions of the library. Only the command-line tools turn them into
one-line messages and exit codes."""

from __future__ import annotations

__all__ = [
    "KerasBnExtError",
    "ModelLoadError",
    "OutputPathError",
    "InvalidBatchNormError",
    "UnsupportedModelError",
    "RebuildMismatchError",
    "FoldError",
    "UnknownLayerError",
    "InputDataError",
    "ExportError",
    "VerificationError",
    "GPUUnavailableError",
    "BackendError",
]


class KerasBnExtError(Exception):
    """Base class of every error this package raises on purpose. `code` is a stable name of
    the kind; `layer` and `op` name the Keras layer and the operation it is about, when
    one is known."""

    code = "error"  # stable, in the CLIs' --json error objects
    layer: str | None = None
    op: str | None = None


class ModelLoadError(KerasBnExtError):
    """A model file cannot be read: missing, not a .keras archive, broken, or unsafe."""

    code = "model_load"


class OutputPathError(KerasBnExtError):
    """An output path cannot be written: it is the input, exists, or its folder is missing."""

    code = "output_path"


class InvalidBatchNormError(KerasBnExtError):
    """A BatchNormalization layer holds statistics that cannot be folded (negative or
    non-finite variance, non-finite gamma/beta/mean)."""

    code = "invalid_batchnorm"


class UnsupportedModelError(KerasBnExtError):
    """A model whose graph cannot be rebuilt (subclassed, unbuilt)."""

    code = "unsupported_model"


class RebuildMismatchError(UnsupportedModelError):
    """A rebuilt layer computes something else than its original on the same inputs: state
    that its config and weights do not carry (and that keras.saving's per-layer variables
    and assets did not restore either). `layer` names it; `max_rel_err` and `mismatches`
    (non-finite elements of the wrong kind) say by how much."""

    code = "rebuild_mismatch"

    def __init__(self, message: str, *, layer: str, max_rel_err: float, mismatches: int = 0):
        super().__init__(message)
        self.layer = layer
        self.max_rel_err = max_rel_err
        self.mismatches = mismatches


class FoldError(KerasBnExtError):
    """`fold_batchnorms` made a model that does not reproduce the original within the
    tolerance (nor within float32 rounding, judged in float64). `report` holds the
    comparison."""

    code = "fold_not_exact"

    def __init__(self, message: str, *, report=None):
        super().__init__(message)
        self.report = report


class UnknownLayerError(KerasBnExtError):
    """A layer named by the caller (`exclude=[...]`, `--exclude NAME`) is not in the model:
    a typo would otherwise silently mean "nothing excluded". `layer` is the first unknown
    name; `known` lists the BatchNormalization layers there are."""

    code = "unknown_layer"

    def __init__(self, message: str, *, layer: str, known: list[str]):
        super().__init__(message)
        self.layer = layer
        self.known = known


class InputDataError(KerasBnExtError):
    """Arrays given for verification do not fit the model's inputs."""

    code = "input_data"


class ExportError(KerasBnExtError):
    """The ONNX conversion failed or produced an invalid model."""

    code = "export"


class VerificationError(KerasBnExtError):
    """A written model cannot be checked against the original: its runtime failed, or its
    outputs differ in names or shapes (a mismatch of values is a failed report, not this)."""

    code = "verification"


class GPUUnavailableError(KerasBnExtError):
    """A GPU run was required (require_gpu=True) but onnxruntime ran on the CPU."""

    code = "gpu_unavailable"


class BackendError(KerasBnExtError):
    """The work needs Keras's TensorFlow backend (conversion goes through TensorFlow) but
    Keras runs on another one in this process."""

    code = "backend"


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
