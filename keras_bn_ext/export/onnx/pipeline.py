"""`export_verified`: fold, convert, check, write, verify — the whole ONNX job.

The file is exported under a temporary name and verified there; it becomes `path` when
no error stops the run. A failed comparison still renames it (for inspection) and
says so in the result; an error leaves nothing behind.
"""

from __future__ import annotations

import os
from pathlib import Path
from dataclasses import dataclass, field
from typing import Sequence

import keras
import numpy as np

from keras_bn_ext.export.onnx import options
from keras_bn_ext.export.onnx.convert import ExportReport, export_onnx
from keras_bn_ext.export.onnx.verify import VerificationReport, verify_onnx
from keras_bn_ext.stage import StageRecord, verify_and_commit

__all__ = ["OnnxResult", "export_verified"]


@dataclass
class OnnxResult:
    export: ExportReport
    verification: VerificationReport
    timings_s: dict[str, float] = field(default_factory=dict)
    stage: StageRecord | None = None

    @property
    def passed(self) -> bool:
        return self.verification.passed

    @property
    def precision(self) -> str:
        return "float16 weights, float32 inputs/outputs" if self.export.fp16 else "float32"

    def to_dict(self) -> dict:
        e, v = self.export, self.verification
        return {
            "output": e.path,
            "opset": e.opset,
            "precision": self.precision,
            "folded": e.fold is not None,
            "bn_folded": e.bn_folded,
            "fold": e.fold.to_dict() if e.fold else None,
            "provider": v.provider,
            "fallback_reason": v.fallback_reason,
            "onnxruntime_version": v.onnxruntime_version,
            "inputs": e.inputs,
            "outputs": [vars(o) for o in v.comparison.outputs],
            "op_counts": e.op_counts,
            "conversion": e.conversion,
            "conversion_fallback": e.conversion_fallback,
            "external_data": e.external_data,
            "external_data_bytes": e.external_data_bytes,
            "guards": e.guards,
            "batch_sizes": v.batch_sizes,
            "atol": v.comparison.atol,
            "rtol": v.comparison.rtol,
            "latency_ms": v.latency_ms,
            "unoptimized_max_rel_err": v.unoptimized.max_rel_err if v.unoptimized else None,
            "diagnosis": v.diagnosis,
            "placement": v.placement.to_dict() if v.placement else None,
            "exact_arithmetic": v.exact.to_dict() if v.exact else None,
            "timings_s": self.timings_s,
            "commit": self.stage.code if self.stage else None,
            "passed": self.passed,
        }


def export_verified(
    model: keras.Model,
    path: str | os.PathLike,
    *,
    fold: bool = True,
    exclude: Sequence[str] = (),
    opset: int = options.DEFAULT_OPSET,
    batch_size: int | None = None,
    fp16: bool = False,
    external_data: bool | None = None,
    conversion: str = "structure",
    inputs: Sequence[np.ndarray] | None = None,
    samples: int = options.SAMPLES,
    provider: str = "auto",
    require_gpu: bool = False,
    require_all_gpu: bool = False,
    atol: float | None = None,
    rtol: float | None = None,
    benchmark: bool = False,
) -> OnnxResult:
    """Export `model` to ONNX at `path` and verify the file on onnxruntime.

    Arguments as `export_onnx` and `verify_onnx`; `atol`/`rtol` default to the float32
    or float16 tolerances of `options`. Verification uses batches of `batch_size` when
    it is fixed, else of sizes `options.BATCH_SIZES`.

    Raises:
        ExportError, VerificationError, GPUUnavailableError, InputDataError.
    """
    atol = atol if atol is not None else (options.FP16_ATOL if fp16 else options.FP32_ATOL)
    rtol = rtol if rtol is not None else (options.FP16_RTOL if fp16 else options.FP32_RTOL)
    staged = verify_and_commit(
        path,
        lambda tmp: export_onnx(model, tmp, fold=fold, exclude=exclude, opset=opset, batch_size=batch_size, fp16=fp16,
                                external_data=external_data, conversion=conversion, atomic=False),
        lambda tmp, _: verify_onnx(
            model, tmp, inputs=inputs, samples=samples,
            batch_sizes=(batch_size,) if batch_size else options.BATCH_SIZES,
            provider=provider, require_gpu=require_gpu, require_all_gpu=require_all_gpu, atol=atol, rtol=rtol,
            benchmark=benchmark),
        keep_failed=True,  # a file outside the tolerance is kept for inspection (exit 1)
        produce_name="export", produce_phase="export", check_phase="verify on onnxruntime",
        bundle=True)  # the model and, with external data, its weights file: both or neither
    staged.product.path = str(path)
    if staged.product.external_data:
        staged.product.external_data = str(Path(path).with_name(Path(staged.product.external_data).name))
    return OnnxResult(export=staged.product, verification=staged.check, timings_s=staged.record.timings_s,
                      stage=staged.record)
