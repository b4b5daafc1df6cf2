"""What every export target's float export accepts: `ExportOptions` (frozen, validated once)
and the tolerances and sample counts its verification defaults to. Imports nothing heavy:
the CLIs print these in --help."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

__all__ = ["BATCH_SIZES", "ExportOptions", "FP16_ATOL", "FP16_RTOL", "FP32_ATOL", "FP32_RTOL", "SAMPLES"]

# The exported graph computes the same float32 operations in another order (other conv
# algorithms, fused bias): a few ulp per layer, ~1e-7 of the output's magnitude on
# small nets and ~1e-6 on ResNet-sized ones. 1e-5 absolute and relative keep a
# margin and still catch a changed weight, which errs by O(1e-2) or more.
FP32_ATOL = 1e-5
FP32_RTOL = 1e-5
# float16 keeps 11 significant bits (unit roundoff 4.9e-4) in every weight and
# intermediate; over tens of layers that reaches ~1e-3 of the output's magnitude
# (measured 6e-5 on LeNet, 7e-4 on MobileNetV2).
FP16_ATOL = 1e-3
FP16_RTOL = 1e-2
SAMPLES = 3  # seeded random batches of each size
BATCH_SIZES = (1, 8)  # through the file's dynamic batch


@dataclass(frozen=True)
class ExportOptions:
    """The float export's options, the same for every target.

    Args:
        fold: Fold BatchNormalization first (`folding.fold_batchnorms`).
        exclude: Names of BN layers the fold keeps (an unknown name is an error).
        fp16: float16 weights, verified with float16 tolerances (targets that can).
        samples: Seeded random batches of each size in `batch_sizes` to verify on.
        inputs: Real arrays (in `model.inputs` order) to verify on instead.
        atol, rtol: Tolerances; None: float32's, or float16's with `fp16`.
        benchmark: Also time the file on the target's runtime.
        batch_size: Fix the batch dimension (None: dynamic; targets that can).
    """

    fold: bool = True
    exclude: tuple[str, ...] = ()
    fp16: bool = False
    samples: int = SAMPLES
    inputs: Sequence | None = None
    atol: float | None = None
    rtol: float | None = None
    benchmark: bool = False
    batch_size: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"samples must be a positive integer. Received: samples={self.samples!r}")
        for name in ("atol", "rtol"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f"{name} must be a non-negative number. Received: {name}={value!r}")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer or None. Received: batch_size={self.batch_size!r}")

    @property
    def tolerances(self) -> tuple[float, float]:
        """(atol, rtol): as given, else float32's or (with fp16) float16's."""
        atol = self.atol if self.atol is not None else (FP16_ATOL if self.fp16 else FP32_ATOL)
        rtol = self.rtol if self.rtol is not None else (FP16_RTOL if self.fp16 else FP32_RTOL)
        return atol, rtol

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        return (self.batch_size,) if self.batch_size else BATCH_SIZES
