"""The real data an INT8 model is made and judged with, for any target: calibration
samples, held-out evaluation samples (given, or the last share of the calibration ones),
their labels, and the float Keras model's outputs on them (the reference)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import keras
import numpy as np

from keras_bn_ext.compare import keras_outputs
from keras_bn_ext.data import array_batches, model_arrays
from keras_bn_ext.errors import InputDataError
from keras_bn_ext.quantization import options
from keras_bn_ext.quantization.fidelity import check_labels, is_classifier_output

__all__ = ["CalibrationSet", "prepare", "predict"]

EVAL_BATCH = 256  # samples per Keras call when computing the reference


def predict(model: keras.Model, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The model's inference outputs over all samples, one array per output."""
    per_batch = [keras_outputs(model, b) for b in array_batches(arrays, EVAL_BATCH)]
    return [np.concatenate([b[j] for b in per_batch]) for j in range(len(per_batch[0]))]


@dataclass
class CalibrationSet:
    calibration: list[np.ndarray]  # per model input, samples on axis 0
    evaluation: list[np.ndarray]
    source: str  # where the evaluation samples come from, said in reports
    labels: np.ndarray | None
    reference: list[np.ndarray]  # the float model's outputs on `evaluation`

    def batches(self, batch_size: int) -> Iterator[list[np.ndarray]]:
        """Calibration batches of exactly `batch_size` samples: the last one is the final
        `batch_size` samples (overlapping the one before), as calibrators stack them."""
        n = len(self.calibration[0])
        for start in range(0, n, batch_size):
            s = min(start, max(0, n - batch_size))
            yield [a[s:s + batch_size] for a in self.calibration]

    def info(self, batch_size: int, method: str) -> dict:
        n = len(self.calibration[0])
        return {"samples": int(n), "batch_size": batch_size, "batches": -(-n // batch_size), "method": method}

    def evaluation_info(self) -> dict:
        return {"samples": int(len(self.evaluation[0])), "source": self.source, "labels": self.labels is not None}


def prepare(model: keras.Model, calibration, *, eval_data=None, labels=None) -> CalibrationSet:
    """Check the data against the model (inputs, shapes, dtypes, empty, NaN; labels: one
    integer class id per evaluation sample, within the classifier's classes) and compute
    the reference. Raises InputDataError."""
    calib = model_arrays(model, calibration, source="calibration data")
    if eval_data is not None:
        evaluation = model_arrays(model, eval_data, source="evaluation data")
        source = "evaluation data"
    else:
        n = len(calib[0])
        held = max(1, int(round(n * options.HOLDOUT_FRACTION)))
        if n - held < 1:
            raise InputDataError(f"calibration data holds {n} sample(s): at least 2 are needed to hold some out for "
                                 "the evaluation (or give evaluation data)")
        evaluation = [a[n - held:] for a in calib]
        calib = [a[: n - held] for a in calib]
        source = f"held out: the last {held} of {n} calibration samples (not calibrated on)"
        if labels is not None and len(np.asarray(labels)) == n:
            labels = np.asarray(labels)[n - held:]
    reference = predict(model, evaluation)
    if labels is not None:
        classes = next((int(r.shape[1]) for r in reference if is_classifier_output(r)), None)
        labels = check_labels(labels, len(evaluation[0]), classes)
    return CalibrationSet(calib, evaluation, source, labels, reference)
