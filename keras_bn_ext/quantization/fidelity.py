"""How close a quantized model's outputs are to the float Keras model's, on real data, and
whether that passes: SQNR, relative errors, top-1 agreement, accuracy with labels.

Target-independent: it compares arrays, whatever runtime produced them (onnxruntime for
ONNX and LiteRT INT8).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from keras_bn_ext import nonfinite
from keras_bn_ext.errors import InputDataError
from keras_bn_ext.quantization import options

__all__ = ["Criteria", "OutputFidelity", "FidelityReport", "is_classifier_output", "measure", "check_labels",
           "commit_measured"]


@dataclass(frozen=True)
class Criteria:
    """What a quantized model must reach. `None` turns a criterion off.

    Attributes:
        min_top1_agreement: each classifier output (rank 2, >= 2 classes) agrees with the
            float model's top-1 class on at least this share of the samples.
        max_accuracy_drop: with labels, the float model's accuracy minus the quantized
            one's, in percentage points, at most this.
        min_sqnr_db: every other output's SQNR (10 log10 of signal over error power), at
            least this.
    """

    min_top1_agreement: float | None = options.MIN_TOP1_AGREEMENT
    max_accuracy_drop: float | None = options.MAX_ACCURACY_DROP
    min_sqnr_db: float | None = options.MIN_SQNR_DB

    def __post_init__(self):
        if self.min_top1_agreement is not None and not 0 <= self.min_top1_agreement <= 1:
            raise ValueError(f"min_top1_agreement must be in [0, 1]. Received: "
                             f"min_top1_agreement={self.min_top1_agreement}")
        if self.max_accuracy_drop is not None and not self.max_accuracy_drop >= 0:
            raise ValueError(f"max_accuracy_drop must be >= 0. Received: max_accuracy_drop={self.max_accuracy_drop}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class OutputFidelity:
    name: str
    sqnr_db: float
    max_rel_err: float  # max|q - f| / max|f|
    mean_rel_err: float  # mean|q - f| / mean|f|
    classifier: bool
    top1_agreement: float | None = None
    accuracy_float: float | None = None  # with labels, on the classifier output they belong to
    accuracy_quantized: float | None = None
    accuracy_drop_pt: float | None = None
    failed: list[str] = field(default_factory=list)  # which criteria it missed, as codes
    # Elements where the quantized output has NaN/inf and the float one not (or the other
    # way round): any one fails the output ("nonfinite"), whatever the other figures say.
    nonfinite_mismatches: int = 0

    @property
    def passed(self) -> bool:
        return not self.failed


@dataclass
class FidelityReport:
    samples: int
    outputs: list[OutputFidelity]
    criteria: Criteria

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    def score(self) -> float:
        """One number to compare attempts (higher is better): the worst margin."""
        worst = math.inf
        for o in self.outputs:
            if o.accuracy_drop_pt is not None:
                worst = min(worst, -o.accuracy_drop_pt)
            elif o.top1_agreement is not None:
                worst = min(worst, 100 * (o.top1_agreement - 1))
            else:
                worst = min(worst, o.sqnr_db / 10 - 10)
        return worst

    def to_dict(self) -> dict:
        return {"samples": self.samples, "criteria": self.criteria.to_dict(), "passed": self.passed,
                "outputs": [{**asdict(o), "passed": o.passed} for o in self.outputs]}


def is_classifier_output(array: np.ndarray) -> bool:
    return array.ndim == 2 and array.shape[1] >= 2


def check_labels(labels, samples: int, classes: int | None, *, source: str = "labels") -> np.ndarray:
    """Integer class ids, one per sample, within the classifier's classes. Raises InputDataError."""
    labels = np.asarray(labels)
    if labels.dtype == object or not (np.issubdtype(labels.dtype, np.integer)
                                      or (np.issubdtype(labels.dtype, np.floating)
                                          and np.all(np.isfinite(labels)) and np.all(labels == np.round(labels)))):
        raise InputDataError(f"{source} must be integer class ids; they hold {labels.dtype} values")
    labels = labels.reshape(-1) if labels.ndim == 2 and labels.shape[1] == 1 else labels
    if labels.ndim != 1 or len(labels) != samples:
        raise InputDataError(f"{source} hold {tuple(labels.shape)} values; one class id per sample "
                             f"({samples}) is needed")
    labels = labels.astype(np.int64)
    if classes is None:
        raise InputDataError(f"{source} given, but the model has no classifier output (rank 2, >= 2 classes)")
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise InputDataError(f"{source} hold class ids from {labels.min()} to {labels.max()}; the classifier "
                             f"output has {classes} classes")
    return labels


def _sqnr_db(ref: np.ndarray, err: np.ndarray) -> float:
    signal, noise = float(np.sum(ref.astype(np.float64) ** 2)), float(np.sum(err.astype(np.float64) ** 2))
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


def measure(reference: Sequence[np.ndarray], quantized: Sequence[np.ndarray], names: Sequence[str], *,
            labels: np.ndarray | None = None, criteria: Criteria = Criteria()) -> FidelityReport:
    """Compare whole-dataset outputs (one array per output, samples on axis 0) of the float
    model (`reference`) and the quantized one, and judge them by `criteria`. `labels`
    (checked with `check_labels`) go with the first classifier output."""
    outputs = []
    labelled = False
    for name, ref, got in zip(names, reference, quantized):
        ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
        # Figures over the elements where both are finite; the rest is counted apart.
        both = np.isfinite(ref) & np.isfinite(got)
        diff = np.abs(got[both] - ref[both])
        d = nonfinite.differences(ref, got)
        top = d.reference_max
        mean = float(np.mean(np.abs(ref[both]))) if diff.size else 0.0
        o = OutputFidelity(
            name=name, sqnr_db=round(_sqnr_db(ref[both], got[both] - ref[both]), 3),
            max_rel_err=d.max_abs / top if top else d.max_abs,
            mean_rel_err=float(np.mean(diff)) / mean if mean else float(np.mean(diff)) if diff.size else 0.0,
            classifier=is_classifier_output(ref),
            nonfinite_mismatches=d.mismatches,
        )
        if d.mismatches:
            o.failed.append("nonfinite")
        if o.classifier:
            ref_top, got_top = np.argmax(ref, axis=1), np.argmax(got, axis=1)
            o.top1_agreement = float(np.mean(ref_top == got_top))
            if labels is not None and not labelled:
                labelled = True
                o.accuracy_float = float(np.mean(ref_top == labels))
                o.accuracy_quantized = float(np.mean(got_top == labels))
                o.accuracy_drop_pt = round(100 * (o.accuracy_float - o.accuracy_quantized), 4)
            if criteria.min_top1_agreement is not None and o.top1_agreement < criteria.min_top1_agreement:
                o.failed.append("top1_agreement")
            if (criteria.max_accuracy_drop is not None and o.accuracy_drop_pt is not None
                    and o.accuracy_drop_pt > criteria.max_accuracy_drop):
                o.failed.append("accuracy_drop")
        elif criteria.min_sqnr_db is not None and o.sqnr_db < criteria.min_sqnr_db:
            o.failed.append("sqnr")
        outputs.append(o)
    samples = int(len(reference[0])) if reference else 0
    return FidelityReport(samples=samples, outputs=outputs, criteria=criteria)


def commit_measured(path, write, rerun, measured: Sequence[np.ndarray], fidelity: FidelityReport, *,
                    bundle: bool = False):
    """Write a measured INT8 file through the verify-and-commit stage (`stage.verify_and_commit`).

    `write(tmp)` puts the file at the temporary path; `rerun(tmp)` runs it from there on
    the first samples of the evaluation and returns its outputs, which must equal
    `measured` (those samples' measured outputs) bit for bit: what is written is what was
    measured. A missed criterion still commits (for inspection); a file that does not
    reproduce leaves nothing. `bundle`: the file has companions (OpenVINO's .bin), committed
    together (`stage.verify_and_commit`).

    Raises:
        VerificationError: the written file does not reproduce the measured outputs.
    """
    from keras_bn_ext.errors import VerificationError
    from keras_bn_ext.stage import FileCheck, verify_and_commit

    def check(tmp, _):
        again = rerun(tmp)
        same = len(again) == len(measured) and all(np.array_equal(a, m) for a, m in zip(again, measured))
        return FileCheck(reproduced=same, fidelity=fidelity)

    staged = verify_and_commit(path, write, check, keep_failed=lambda c: c.reproduced, check_name="verify_file",
                               check_phase="run the written file again", bundle=bundle)
    if not staged.check.reproduced:
        raise VerificationError(f"the written INT8 file {path} does not reproduce the measured outputs "
                                "(nothing was written)")
    return staged
