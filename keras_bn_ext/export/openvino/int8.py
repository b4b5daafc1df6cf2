"""The OpenVINO target's INT8 quantizer, for the shared driver (`export.int8.export_int8`).

The ONNX target's quantizer writes the calibrated QDQ graph (tf2onnx, onnxruntime's
pre-step and static quantization, the same ranking for the node fallback); OpenVINO's ONNX
frontend turns each QuantizeLinear/DequantizeLinear pair into a FakeQuantize and its CPU
plugin runs the convolutions in int8. The driver measures, times and commits the IR
(`.xml` + `.bin`, a bundle) on OpenVINO's own runtime."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from keras_bn_ext.export.onnx.options import OnnxInt8Options, OnnxOptions
from keras_bn_ext.progress import phase

__all__ = ["OpenVINOInt8Detail", "OpenVINOQuantizer"]


@dataclass
class OpenVINOInt8Detail:
    qdq: object  # the ONNX quantizer's OnnxInt8Detail of the graph OpenVINO compiled

    format = "OpenVINO IR from the QDQ graph (FakeQuantize)"

    def to_dict(self) -> dict:
        return {"format": self.format, "qdq": self.qdq.to_dict()}


def _save_ir(onnx_path: Path, xml_path: Path) -> Path:
    import openvino as ov

    with phase("convert the QDQ graph (OpenVINO)"):
        ov.save_model(ov.convert_model(str(onnx_path)), str(xml_path), compress_to_fp16=False)
    return xml_path


class OpenVINOQuantizer:
    """The ONNX target's QDQ graph compiled to IR: calibrated (`OnnxQuantizer`), or, for a
    quantization-aware model, written from its learned ranges (`QatOnnxQuantizer`)."""

    def __init__(self, int8: OnnxInt8Options, model, data, options, work: Path):
        from keras_bn_ext.export.onnx.int8 import OnnxQuantizer
        from keras_bn_ext.export.onnx.qat import QatOnnxQuantizer
        from keras_bn_ext.export.openvino.target import OPENVINO
        from keras_bn_ext.qat.model import is_qat_model

        if is_qat_model(model):
            self.qdq = QatOnnxQuantizer(OnnxOptions(), model, data, options, work)
        else:
            self.qdq = OnnxQuantizer(OnnxOptions(), int8, model, data, options, work)
        self.runner, self.work = OPENVINO, work
        self.method, self.can_rank = self.qdq.method, self.qdq.can_rank
        self.equalize_by_default = self.qdq.equalize_by_default
        self.onnx_files: dict[Path, Path] = {}  # each IR's ONNX graph (the ranking reads those)

    def _ir(self, onnx_path: Path) -> Path:
        xml = _save_ir(onnx_path, onnx_path.with_suffix(".xml"))
        self.onnx_files[xml] = onnx_path
        return xml

    def float_file(self, candidate, tag: str) -> Path:
        onnx_path = self.qdq.float_file(candidate, tag)
        xml = onnx_path.with_suffix(".xml")
        return xml if xml in self.onnx_files else self._ir(onnx_path)

    def quantize(self, candidate, tag: str, excluded: list[str]) -> Path:
        return self._ir(self.qdq.quantize(candidate, tag, excluded))

    def rank(self, float_file: Path, int8_file: Path, tag: str) -> list[dict]:
        return self.qdq.rank(self.onnx_files[float_file], self.onnx_files[int8_file], tag)

    def copy(self, source: Path, destination: Path) -> None:
        for suffix in (".xml", ".bin"):
            shutil.copyfile(source.with_suffix(suffix), destination.with_suffix(suffix))
        if source in self.onnx_files:
            self.onnx_files[destination] = self.onnx_files[source]

    def size(self, path: Path) -> int:
        return os.path.getsize(path.with_suffix(".bin"))  # the weights

    def op_counts(self, path: Path) -> dict:
        return {}  # the driver takes OpenVINO's reading of the written file

    def detail(self, tag: str) -> OpenVINOInt8Detail:
        return OpenVINOInt8Detail(self.qdq.detail(tag))
