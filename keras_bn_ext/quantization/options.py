"""INT8 choices and defaults every target shares, for the library and the CLIs (this module
imports nothing heavy: the CLI prints these in --help)."""

# Samples per calibration batch (onnxruntime collects ranges batch by batch).
CALIBRATION_BATCH_SIZE = 32
# Without --eval, this share of the calibration samples (at least 1, the last ones) is held
# out for the fidelity check instead of calibrating on it.
HOLDOUT_FRACTION = 0.2

# Pass criteria. A classifier output (rank 2, >= 2 classes) must agree with the float
# model's top-1 class on this share of the samples; with labels, its accuracy may drop by
# at most this many points; any other output needs this SQNR (20 dB: the noise power is 1%
# of the signal's).
MIN_TOP1_AGREEMENT = 0.98
MAX_ACCURACY_DROP = 0.5  # percentage points
MIN_SQNR_DB = 20.0
# Accuracy-driven fallback: at most this many quantized nodes are kept in float.
FALLBACK_BUDGET = 5

# --equalize: auto = on with per-tensor weights (where one range must serve every channel),
# off with per-channel; on / off force it.
EQUALIZE_CHOICES = ("auto", "on", "off")


def check_int8_arguments(*, equalize: str, calibration_batch_size: int) -> None:
    """The checks every target's INT8 export makes on the arguments they share (ValueError,
    ending `Received: name=value`)."""
    if equalize not in EQUALIZE_CHOICES:
        raise ValueError(f"equalize must be one of {EQUALIZE_CHOICES}. Received: equalize={equalize!r}")
    if not isinstance(calibration_batch_size, int) or calibration_batch_size < 1:
        raise ValueError(f"calibration_batch_size must be a positive integer. "
                         f"Received: calibration_batch_size={calibration_batch_size!r}")
