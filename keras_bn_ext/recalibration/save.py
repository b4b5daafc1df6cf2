"""`recalibrate_to_file`: recalibrate, save, load the saved file back and check it.

What is written is what was checked: the file is saved under a temporary name, loaded as
a user would load it, compared with the recalibrated model, and only then renamed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import keras
import numpy as np

from keras_bn_ext.progress import phase
from keras_bn_ext.compare import ComparisonReport, keras_outputs, output_names
from keras_bn_ext.recalibration.options import BATCH_SIZE
from keras_bn_ext.stage import reloaded_keras_check, verify_and_commit
from keras_bn_ext.recalibration.statistics import (
    Batches,
    RecalibrationReport,
    recalibrate_batchnorms,
    statistics_of,
)

__all__ = ["RecalibrationResult", "recalibrate_to_file"]


@dataclass
class RecalibrationResult:
    """What `recalibrate_to_file` did. `output` is None when nothing was written."""

    recalibration: RecalibrationReport
    output: str | None
    file_check: ComparisonReport | None = None  # the written file, reloaded, vs the model
    statistics_equal: bool | None = None  # the reloaded file holds the new statistics, bit for bit
    reload_error: str | None = None

    @property
    def passed(self) -> bool:
        return (self.reload_error is None and self.file_check is not None and self.file_check.passed
                and bool(self.statistics_equal))

    def to_dict(self) -> dict:
        return {
            "output": self.output,
            "passed": self.passed,
            "file_max_rel_err": self.file_check.max_rel_err if self.file_check else None,
            "statistics_equal": self.statistics_equal,
            "reload_error": self.reload_error,
            "recalibration": self.recalibration.to_dict(),
        }


def recalibrate_to_file(
    model: keras.Model,
    data,
    path: str | os.PathLike,
    *,
    mode: str = "exact",
    batch_size: int = BATCH_SIZE,
    include_frozen: bool = True,
    safe_mode: bool = True,
    check_batches: int = 2,
) -> RecalibrationResult:
    """Recalibrate `model` in place (`recalibrate_batchnorms`) and write it to `path`.

    What is written is what was checked: the model is saved under a temporary name
    beside `path`, loaded back as a user would load it, its BN statistics compared with
    the recalibrated ones (bit for bit) and its outputs with the model's on the first
    `check_batches` batches of the data (the same float32 graph and weights: to 1e-6);
    only then is it renamed into place. Otherwise nothing is written.

    Args:
        model, data, mode, batch_size, include_frozen: As `recalibrate_batchnorms`.
        path: The output .keras file (check it first with `model_io.check_output_path`).
        safe_mode: How the written file is loaded back (False for trusted Lambda layers).
        check_batches: Batches of the data the reloaded file is compared on.
    """
    with phase(f"recalibrate ({mode})"):
        report = recalibrate_batchnorms(model, data, mode=mode, batch_size=batch_size,
                                        include_frozen=include_frozen)
    result = RecalibrationResult(recalibration=report, output=None)
    batches = []
    for batch in Batches(model, data, batch_size, one_pass=True):
        batches.append(batch)
        if len(batches) >= check_batches:
            break
    expected = [keras_outputs(model, b) for b in batches]

    def check(tmp, _):
        return reloaded_keras_check(tmp, expected, batches, output_names(model), safe_mode=safe_mode,
                                    also=lambda reloaded: {"statistics_equal": _same_statistics(model, reloaded)})

    staged = verify_and_commit(path, model.save, check, produce_name="save", check_name="verify_file",
                               check_phase="reload and verify the file")
    result.file_check, result.statistics_equal = staged.check.comparison, staged.check.statistics_equal
    result.reload_error, result.output = staged.check.reload_error, staged.record.output
    return result


def _same_statistics(model, reloaded) -> bool:
    mine, theirs = statistics_of(model), statistics_of(reloaded)
    return len(mine) == len(theirs) and all(np.array_equal(a, b) for a, b in zip(mine, theirs))

