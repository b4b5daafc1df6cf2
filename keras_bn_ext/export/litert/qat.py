"""The LiteRT INT8 file of a quantization-aware model, from its learned ranges (no calibration).

TensorFlow's LiteRT converter reads the QAT model's plain twin (`export.qat.export_model`):
each activation marker (FakeQuantWithMinMaxArgs) sets the int8 grid of its tensor (the
uint8 grid shifted by 128: the same values), and the converter quantizes each weight
symmetrically on [-127, 127], max|w| / 127 per output channel (or per tensor), which is the
QAT kernel's own grid, so its integers are the trained ones. A tensor with no marker stays
float, as in the simulation (the float logits' layer runs on dequantized inputs).

Only grids the converter writes exactly are accepted: 8-bit weights on the full [-127, 127]
(a model trained for a CPU without VNNI holds 7-bit weights, and 4-bit weights have no
builtin LiteRT kernel): those are refused with the reason, never rounded again.
"""

from __future__ import annotations

from pathlib import Path

from keras_bn_ext.errors import UnsupportedModelError
from keras_bn_ext.export.litert.convert import to_tflite_bytes
from keras_bn_ext.export.litert.int8 import LiteRTInt8Detail, LiteRTQuantizer
from keras_bn_ext.export.qat import export_model, per_channel_of, weight_qmax_of
from keras_bn_ext.progress import phase

__all__ = ["LITERT_QMAX", "QatLiteRTQuantizer"]

LITERT_QMAX = 127  # the converter's symmetric int8 weight grid


class QatLiteRTQuantizer(LiteRTQuantizer):
    """The shared INT8 driver's quantizer for a QAT model on LiteRT: ranges from the model."""

    method = "learned (quantization-aware training)"

    def __init__(self, model, data, options, work: Path):
        super().__init__(data, options, work)
        qmax = weight_qmax_of(model)
        if qmax != LITERT_QMAX:
            raise UnsupportedModelError(
                f"'{model.name}' was trained with weights on [-{qmax}, {qmax}], a grid LiteRT's converter would "
                f"round again (it writes [-{LITERT_QMAX}, {LITERT_QMAX}]): train it for this target with "
                "quantize_model(..., weight_bits=8, target='litert') (bn-qat --target litert)")
        self.per_channel = per_channel_of(model)

    def float_file(self, candidate, tag: str) -> Path:
        path = self.work / f"{tag}.float.tflite"
        if not path.exists():
            with phase("convert the float twin (LiteRT converter)"):
                path.write_bytes(to_tflite_bytes(export_model(candidate, markers=False)))
        return path

    def quantize(self, candidate, tag: str, excluded: list[str]) -> Path:
        from keras_bn_ext.errors import ExportError

        if excluded:
            raise ExportError("a QAT model's file is written as it was trained; no node is kept in float")
        path = self.work / f"{tag}.int8.tflite"
        with phase("convert with the learned ranges (LiteRT converter)"):
            path.write_bytes(to_tflite_bytes(export_model(candidate, weight_markers=True), learned=True))
        return path

    def detail(self, tag: str) -> LiteRTInt8Detail:
        return LiteRTInt8Detail(per_channel=self.per_channel)
