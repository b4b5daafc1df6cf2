"""The LiteRT target: .tflite files from TensorFlow's converter, verified on ai-edge-litert's
interpreter through the `serving_default` signature (Keras's names, dynamic batch resized)."""

from __future__ import annotations

from keras_bn_ext.export.target import Capabilities, RunResult, Target

__all__ = ["LITERT", "LiteRTTarget"]


class LiteRTTarget(Target, name="litert", suffix=".tflite", runtime="ai-edge-litert",
                   capabilities=Capabilities(fp16=True, int8=True, external_data=False, dynamic_batch=True,
                                             learned_int8=True)):
    """.tflite files; INT8 from TensorFlow's converter with a representative dataset, or, for
    a quantization-aware model, from its learned ranges (`export.litert.qat`)."""

    def convert(self, model, path, options):
        from keras_bn_ext.export.litert.convert import convert_litert_file

        return convert_litert_file(model, path, options)

    def run(self, path, batches, *, keras_names, repeats=0):
        from keras_bn_ext.export.litert import _litert_worker
        from keras_bn_ext.export.litert.convert import SIGNATURE
        from keras_bn_ext.export.runner import run_worker

        outputs, meta = run_worker(_litert_worker.__file__, path, batches, keras_names=keras_names,
                                   runtime="the LiteRT interpreter", repeats=repeats, meta={"signature": SIGNATURE})
        return RunResult(outputs=outputs, runtime="ai-edge-litert", runtime_version=meta.get("version", ""),
                         latency_ms=meta.get("latency_ms", {}), op_counts=meta.get("op_counts", {}))

    def int8_quantizer(self, model, data, options, work):
        from keras_bn_ext.export.litert.int8 import LiteRTQuantizer
        from keras_bn_ext.qat.model import is_qat_model

        if is_qat_model(model):  # its ranges are learned: the converter takes them from its markers
            from keras_bn_ext.export.litert.qat import QatLiteRTQuantizer

            return QatLiteRTQuantizer(model, data, options, work)
        return LiteRTQuantizer(data, options, work)

    def report_detail(self, conversion, verification) -> dict:
        from keras_bn_ext.export.litert.convert import SIGNATURE, STATIC_BATCH_NOTE

        return {"signature": SIGNATURE, "batch_note": STATIC_BATCH_NOTE if conversion.batch_size else None}


LITERT = LiteRTTarget()
