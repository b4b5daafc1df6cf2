"""`export_openvino_int8`: INT8 OpenVINO IR from the calibrated QDQ graph.

The ONNX target's INT8 export (`export.onnx.int8.export_int8`: data checks, fold,
equalization, onnxruntime's calibration, the fallback) writes the QDQ graph; OpenVINO's
ONNX frontend turns each QuantizeLinear/DequantizeLinear pair into its FakeQuantize and its
CPU plugin runs the convolutions in int8. The IR is then judged on OpenVINO's own runtime
against the float Keras model (`quantization.fidelity`, the same criteria), the float IR and
the INT8 IR are timed side by side there, and the file is committed through the stage (a
missed criterion still writes it, for inspection)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from keras_bn_ext.compare import input_specs, output_names
from keras_bn_ext.data import array_batches
from keras_bn_ext.export.openvino.target import OPENVINO
from keras_bn_ext.progress import phase
from keras_bn_ext.quantization.calibration import EVAL_BATCH, prepare
from keras_bn_ext.quantization.fidelity import Criteria, FidelityReport, commit_measured, measure
from keras_bn_ext.stage import StageRecord

__all__ = ["OpenVINOInt8Result", "export_openvino_int8"]

LATENCY_BATCH = 8
LATENCY_REPEATS = 30


@dataclass
class OpenVINOInt8Result:
    path: str
    fidelity: FidelityReport  # on OpenVINO's runtime, against the float Keras model
    onnxruntime_fidelity: FidelityReport  # the same QDQ graph on onnxruntime, for comparison
    size_bytes: dict  # {"float", "int8", "ratio"} of the IR weights (.bin)
    latency_ms: dict  # {"batch", "float", "int8", "ratio"} on OpenVINO's CPU runtime
    runtime_version: str
    evaluation: dict
    bn_folded: int
    timings_s: dict = field(default_factory=dict)
    stage: StageRecord | None = None

    @property
    def passed(self) -> bool:
        return self.fidelity.passed

    @property
    def int8_slower(self) -> bool:
        """INT8 ran slower than float on this machine's OpenVINO (it does not pay here)."""
        return bool(self.latency_ms) and self.latency_ms["ratio"] > 1.0

    def to_dict(self) -> dict:
        return {"target": "openvino", "output": self.path, "format": "OpenVINO IR from the QDQ graph (FakeQuantize)",
                "runtime": "openvino", "runtime_version": self.runtime_version, "evaluation": self.evaluation,
                "fidelity": self.fidelity.to_dict(), "onnxruntime_fidelity": self.onnxruntime_fidelity.to_dict(),
                "size_bytes": self.size_bytes, "latency_ms": self.latency_ms, "int8_slower": self.int8_slower,
                "bn_folded": self.bn_folded, "timings_s": self.timings_s,
                "commit": self.stage.code if self.stage else None, "passed": self.passed}


def _save_ir(onnx_path, xml_path) -> None:
    import openvino as ov

    ov.save_model(ov.convert_model(str(onnx_path)), str(xml_path), compress_to_fp16=False)


def export_openvino_int8(model: keras.Model, path: str | os.PathLike, calibration, *, eval_data=None, labels=None,
                         criteria: Criteria = Criteria(), **onnx_options) -> OpenVINOInt8Result:
    """Quantize `model` (the ONNX target's INT8 export, `onnx_options` as `export_int8`'s:
    exclude, per_channel, method, target_cpu, equalize, ...), convert the QDQ graph to
    OpenVINO IR at `path` (.xml + .bin) and measure it on OpenVINO against the float model.

    Raises:
        InputDataError, ExportError, VerificationError, ValueError (an argument).
    """
    from keras_bn_ext.export.onnx.int8 import export_int8

    data = prepare(model, calibration, eval_data=eval_data, labels=labels)
    names = [n for n, _, _ in input_specs(model)]
    keras_names = output_names(model)
    with tempfile.TemporaryDirectory(prefix="keras_bn_ext_openvino_int8_") as work:
        work = Path(work)
        qdq = export_int8(model, work / "m.int8.onnx", calibration, eval_data=eval_data, labels=labels,
                          criteria=criteria, **onnx_options)
        with phase("convert the QDQ graph (OpenVINO)"):
            _save_ir(work / "m.int8.onnx", work / "int8.xml")
        feeds = [dict(zip(names, b)) for b in array_batches(data.evaluation, EVAL_BATCH)]
        with phase(f"measure on {len(data.evaluation[0])} samples (OpenVINO)"):
            ran = OPENVINO.run(work / "int8.xml", feeds, keras_names=keras_names)
        got = [np.concatenate([b[j] for b in ran.outputs]) for j in range(len(keras_names))]
        fidelity = measure(data.reference, got, keras_names, labels=data.labels, criteria=criteria)
        with phase("time float and INT8 (OpenVINO)"):
            from keras_bn_ext.export.options import ExportOptions

            OPENVINO.convert(model, work / "float.xml", ExportOptions(exclude=tuple(onnx_options.get("exclude", ()))))
            feed = [dict(zip(names, [a[:LATENCY_BATCH] for a in data.evaluation]))]
            times = {label: OPENVINO.run(work / f"{label}.xml", feed, keras_names=keras_names,
                                         repeats=LATENCY_REPEATS).latency_ms
                     for label in ("float", "int8")}
        batch = str(len(feed[0][names[0]]))
        latency = {"batch": int(batch), "float": times["float"][batch], "int8": times["int8"][batch]}
        latency["ratio"] = round(latency["int8"] / latency["float"], 3)
        sizes = {"float": os.path.getsize(work / "float.bin"), "int8": os.path.getsize(work / "int8.bin")}
        sizes["ratio"] = round(sizes["int8"] / sizes["float"], 4)

        def write(tmp):
            for suffix in (".xml", ".bin"):
                Path(tmp).with_suffix(suffix).write_bytes((work / f"int8{suffix}").read_bytes())

        first = [dict(zip(names, [a[:EVAL_BATCH] for a in data.evaluation]))]
        staged = commit_measured(path, write, lambda tmp: OPENVINO.run(tmp, first, keras_names=keras_names).outputs[0],
                                 [g[:EVAL_BATCH] for g in got], fidelity, bundle=True)
    return OpenVINOInt8Result(path=str(path), fidelity=fidelity, onnxruntime_fidelity=qdq.fidelity, size_bytes=sizes,
                              latency_ms=latency, runtime_version=ran.runtime_version,
                              evaluation=data.evaluation_info(), bn_folded=qdq.fold.bn_folded,
                              timings_s=qdq.timings_s, stage=staged.record)
