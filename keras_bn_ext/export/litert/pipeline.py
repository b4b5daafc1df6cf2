"""`export_litert_verified`: fold, convert, verify, commit — the whole LiteRT job. The file
is converted under a temporary name, verified there, and renamed (a failed comparison
still renames it, for inspection, and says so); an error leaves nothing behind."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

import keras
import numpy as np

from keras_bn_ext.export.litert.convert import LiteRTExportReport, export_litert
from keras_bn_ext.export.litert.verify import LiteRTVerification, verify_litert
from keras_bn_ext.export.onnx import options
from keras_bn_ext.stage import StageRecord, verify_and_commit

__all__ = ["LiteRTResult", "export_litert_verified"]


@dataclass
class LiteRTResult:
    export: LiteRTExportReport
    verification: LiteRTVerification
    timings_s: dict[str, float] = field(default_factory=dict)
    stage: StageRecord | None = None

    @property
    def passed(self) -> bool:
        return self.verification.passed

    def to_dict(self) -> dict:
        e = self.export
        return {"output": e.path, "precision": e.precision, "folded": e.fold is not None, "bn_folded": e.bn_folded,
                "fold": e.fold.to_dict() if e.fold else None, "inputs": e.inputs, "outputs_names": e.outputs,
                "batch_size": e.batch_size, "batch_note": e.batch_note,
                "verification": self.verification.to_dict(), "timings_s": self.timings_s,
                "commit": self.stage.code if self.stage else None, "passed": self.passed}


def export_litert_verified(
    model: keras.Model,
    path: str | os.PathLike,
    *,
    fold: bool = True,
    exclude: Sequence[str] = (),
    fp16: bool = False,
    inputs: Sequence[np.ndarray] | None = None,
    samples: int = options.SAMPLES,
    atol: float | None = None,
    rtol: float | None = None,
    benchmark: bool = False,
) -> LiteRTResult:
    """Export `model` to LiteRT at `path` and verify the file on ai-edge-litert (batch sizes
    1 and 8 through the dynamic batch, or `inputs`). Tolerances default to float32's, or
    float16's with `fp16` (the ONNX target's, same reasons)."""
    atol = atol if atol is not None else (options.FP16_ATOL if fp16 else options.FP32_ATOL)
    rtol = rtol if rtol is not None else (options.FP16_RTOL if fp16 else options.FP32_RTOL)
    staged = verify_and_commit(
        path,
        lambda tmp: export_litert(model, tmp, fold=fold, exclude=exclude, fp16=fp16, atomic=False),
        lambda tmp, export: verify_litert(model, tmp, inputs=inputs, samples=samples, atol=atol, rtol=rtol,
                                          benchmark=benchmark, fixed_batch=export.batch_size),
        keep_failed=True,  # a file outside the tolerance is kept for inspection (exit 1)
        produce_name="export", produce_phase="fold and convert (LiteRT converter)",
        check_phase="verify on ai-edge-litert")
    export = staged.product
    export.path = str(path)
    export.op_counts = staged.check.op_counts
    return LiteRTResult(export=export, verification=staged.check, timings_s=staged.record.timings_s,
                        stage=staged.record)
