"""`export_litert_int8`: full-integer INT8 LiteRT, calibrated and judged like the ONNX INT8
file — the same data checks, hold-out and reference (`quantization.calibration`) and the
same fidelity and criteria (`quantization.fidelity`); only the converter (TensorFlow's,
with a representative dataset) and the runner (ai-edge-litert) are LiteRT's."""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import keras
import numpy as np

from keras_bn_ext.compare import input_specs, output_names
from keras_bn_ext.data import array_batches
from keras_bn_ext.export.litert.convert import to_tflite_bytes
from keras_bn_ext.export.litert.target import LITERT
from keras_bn_ext.folding.fold import FoldReport, fold_batchnorms
from keras_bn_ext.progress import phase, steps
from keras_bn_ext.stage import StageRecord
from keras_bn_ext.quantization import options
from keras_bn_ext.quantization.calibration import EVAL_BATCH, prepare
from keras_bn_ext.quantization.equalize import EqualizationReport, equalize_verified
from keras_bn_ext.quantization.fidelity import Criteria, FidelityReport, commit_measured, measure

__all__ = ["LiteRTInt8Result", "export_litert_int8"]


@dataclass
class LiteRTInt8Result:
    path: str
    calibration: dict
    evaluation: dict
    fold: FoldReport
    fidelity: FidelityReport
    size_bytes: dict
    op_counts: dict = field(default_factory=dict)
    equalization: EqualizationReport | None = None
    runtime_version: str = ""
    timings_s: dict = field(default_factory=dict)
    stage: StageRecord | None = None  # what the verify-and-commit stage did

    @property
    def passed(self) -> bool:
        return self.fidelity.passed

    def to_dict(self) -> dict:
        return {"output": self.path, "format": "full-integer INT8 (float32 inputs and outputs)",
                "calibration": self.calibration, "evaluation": self.evaluation, "fidelity": self.fidelity.to_dict(),
                "size_bytes": self.size_bytes, "op_counts": self.op_counts, "runtime": "ai-edge-litert",
                "runtime_version": self.runtime_version, "bn_folded": self.fold.bn_folded,
                "bn_total": self.fold.bn_total,
                "equalization": self.equalization.to_dict() if self.equalization else None, "timings_s": self.timings_s,
            "commit": self.stage.code if self.stage else None, "passed": self.passed}


def export_litert_int8(
    model: keras.Model,
    path: str | os.PathLike,
    calibration,
    *,
    eval_data=None,
    labels=None,
    exclude: Sequence[str] = (),
    criteria: Criteria = Criteria(),
    calibration_batch_size: int = options.CALIBRATION_BATCH_SIZE,
    equalize: str = "auto",
    relu6_to_relu: bool = False,
) -> LiteRTInt8Result:
    """Fold `model`, convert it to full-integer INT8 LiteRT calibrated on `calibration`,
    and measure it against the float Keras model on the evaluation samples (arguments as
    `export.onnx.int8.export_int8`). `equalize`: "auto" equalizes (`quantization.equalize`)
    when the plain file misses a criterion and keeps the better of the two; "on" / "off".
    The file is written through a temporary name and measured there; a missed criterion
    still writes it (for inspection), `passed` False.

    Raises:
        InputDataError, ExportError, VerificationError, BackendError, ValueError (an argument).
    """
    options.check_int8_arguments(equalize=equalize, calibration_batch_size=calibration_batch_size)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    data = prepare(model, calibration, eval_data=eval_data, labels=labels)
    folded, fold_report = fold_batchnorms(model, exclude=exclude)
    names = [n for n, _, _ in input_specs(model)]
    keras_names = output_names(model)

    batches = data.info(calibration_batch_size, "")["batches"]

    def attempt(candidate):
        with steps("convert and calibrate (LiteRT converter)", batches) as advance:
            def representative():
                for batch in data.batches(calibration_batch_size):
                    yield [np.asarray(a) for a in batch]
                    advance()

            quantized = to_tflite_bytes(candidate, representative=representative)
        with tempfile.TemporaryDirectory(prefix="keras_bn_ext_litert_") as work:
            file = Path(work) / "m.tflite"
            file.write_bytes(quantized)
            feeds = [dict(zip(names, b)) for b in array_batches(data.evaluation, EVAL_BATCH)]
            with phase(f"measure on {len(data.evaluation[0])} samples"):
                ran = LITERT.run(file, feeds, keras_names=keras_names)
                got, meta = ran.outputs, {"op_counts": ran.op_counts, "version": ran.runtime_version}
        outputs = [np.concatenate([b[j] for b in got]) for j in range(len(keras_names))]
        fid = measure(data.reference, outputs, keras_names, labels=data.labels, criteria=criteria)
        return quantized, fid, meta, outputs

    float_size = len(to_tflite_bytes(folded))
    equalization, first = None, [a[:64] for a in data.evaluation]
    if equalize == "on":
        folded, equalization, _ = equalize_verified(folded, first, relu6_to_relu=relu6_to_relu)
    quantized, fidelity, meta, measured = attempt(folded)
    if equalize == "auto" and not fidelity.passed:
        eq, eq_report, _ = equalize_verified(folded, first, relu6_to_relu=relu6_to_relu)
        if eq_report.pairs:
            tried = attempt(eq)
            if tried[1].score() > fidelity.score():
                (quantized, fidelity, meta, measured), equalization = tried, eq_report
    timings["convert_and_measure"] = round(time.perf_counter() - start, 4)
    feeds = [dict(zip(names, [a[:EVAL_BATCH] for a in data.evaluation]))]
    staged = commit_measured(path, lambda tmp: Path(tmp).write_bytes(quantized),
                    lambda tmp: LITERT.run(tmp, feeds, keras_names=keras_names).outputs[0],
                    [m[:EVAL_BATCH] for m in measured], fidelity)
    return LiteRTInt8Result(
        path=str(path), calibration=data.info(calibration_batch_size, "TFLiteConverter representative dataset"),
        evaluation=data.evaluation_info(), fold=fold_report, fidelity=fidelity,
        size_bytes={"float": float_size, "int8": len(quantized), "ratio": round(len(quantized) / float_size, 4)},
        op_counts=meta.get("op_counts", {}), equalization=equalization, runtime_version=meta.get("version", ""), timings_s=timings,
        stage=staged.record,
    )
