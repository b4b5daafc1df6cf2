"""What quantization-aware training accepts (imports nothing heavy: `bn-qat --help` and its
argument checks read it before TensorFlow is imported)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EQUALIZE", "QatOptions", "TARGETS", "TARGET_WEIGHT_BITS", "WEIGHT_BITS", "check_target_bits"]

WEIGHT_BITS = (8, 4)  # symmetric, narrow range: [-127, 127] (or [-63, 63]) and [-7, 7]
TARGETS = ("onnx", "litert")  # the runtimes whose INT8 graph a QAT model simulates
# LiteRT's converter writes int8 weights on [-127, 127] only (no int4 builtin kernels).
TARGET_WEIGHT_BITS = {"onnx": (8, 4), "litert": (8,)}
EQUALIZE = ("auto", "on", "off")  # cross-layer equalization before QAT ("auto": with per-tensor weights)


@dataclass(frozen=True)
class QatOptions:
    """How `train_qat_to_file` trains (validated once).

    Args:
        epochs: Passes over the training data.
        batch_size: Training batch size.
        learning_rate: Adam's (QAT fine-tunes a trained network: small).
        weight_bits, per_channel, target, bn_freeze_after: As `quantize_model`.
        calibration_samples: The first this many training samples start the ranges.
    """

    epochs: int = 1
    batch_size: int = 64
    learning_rate: float = 1e-4
    weight_bits: int = 8
    per_channel: bool = True
    target: str = "onnx"
    calibration_samples: int = 512
    bn_freeze_after: int | None = None

    def __post_init__(self):
        for name in ("epochs", "batch_size", "calibration_samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer. Received: {name}={value!r}")
        if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be positive. Received: learning_rate={self.learning_rate!r}")
        if self.weight_bits not in WEIGHT_BITS:
            raise ValueError(f"weight_bits must be one of {WEIGHT_BITS}. Received: weight_bits={self.weight_bits!r}")
        if not isinstance(self.per_channel, bool):
            raise ValueError(f"per_channel must be a bool. Received: per_channel={self.per_channel!r}")
        if self.bn_freeze_after is not None and (not isinstance(self.bn_freeze_after, int)
                                                 or isinstance(self.bn_freeze_after, bool) or self.bn_freeze_after < 0):
            raise ValueError("bn_freeze_after must be a non-negative integer or None. "
                             f"Received: bn_freeze_after={self.bn_freeze_after!r}")
        check_target_bits(self.target, self.weight_bits)


def check_target_bits(target: str, weight_bits: int) -> None:
    """Refuse a target the QAT model cannot simulate, or weight bits its runtime cannot hold."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}. Received: target={target!r}")
    if weight_bits not in TARGET_WEIGHT_BITS[target]:
        raise ValueError(f"the {target} target holds weights of {' or '.join(map(str, TARGET_WEIGHT_BITS[target]))} "
                         f"bits. Received: weight_bits={weight_bits!r}, target={target!r}")
