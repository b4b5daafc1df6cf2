"""The OpenVINO target: IR files (`.xml` + `.bin`), verified on OpenVINO's CPU runtime."""

from __future__ import annotations

from keras_bn_ext.export.onnx.options import OnnxInt8Options
from keras_bn_ext.export.target import Capabilities, RunResult, Target

__all__ = ["OPENVINO", "OpenVINOTarget"]


# external_data: the weights are the .bin beside the .xml, committed with it.
class OpenVINOTarget(Target, name="openvino", suffix=".xml", runtime="openvino",
                     capabilities=Capabilities(fp16=True, int8=True, external_data=True, dynamic_batch=True,
                                               learned_int8=True)):
    """OpenVINO IR; `int8`: the options of the QDQ graph its INT8 files are compiled from."""

    def convert(self, model, path, options):
        from keras_bn_ext.export.openvino.convert import convert_openvino

        return convert_openvino(model, path, options)

    def __init__(self, int8: OnnxInt8Options = OnnxInt8Options()):
        self.int8 = int8

    def int8_quantizer(self, model, data, options, work):
        from keras_bn_ext.export.openvino.int8 import OpenVINOQuantizer

        return OpenVINOQuantizer(self.int8, model, data, options, work)

    def run(self, path, batches, *, keras_names, repeats=0):
        from keras_bn_ext.export.openvino import _openvino_worker
        from keras_bn_ext.export.runner import run_worker

        outputs, meta = run_worker(_openvino_worker.__file__, path, batches, keras_names=keras_names,
                                   runtime="OpenVINO", repeats=repeats)
        return RunResult(outputs=outputs, runtime="openvino", runtime_version=meta.get("version", ""),
                         device=f"CPU ({meta.get('precision', 'f32')})", latency_ms=meta.get("latency_ms", {}),
                         op_counts=meta.get("op_counts", {}))

    def report_detail(self, conversion, verification) -> dict:
        return {"weights_file": conversion.companions[0] if conversion.companions else None,
                "inference_precision": "f32"}


OPENVINO = OpenVINOTarget()
