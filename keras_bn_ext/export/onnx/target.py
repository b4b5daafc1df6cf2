"""The ONNX target: tf2onnx's files, verified on onnxruntime (CUDA when it really runs, else
the CPU). Its verification is its own (`verify.verify_onnx`): it also says which provider
ran and why, where onnxruntime placed each node, and whether onnxruntime's optimizer (not the
graph) is wrong; the driver and the stage are the shared ones."""

from __future__ import annotations

import dataclasses

from keras_bn_ext.export.onnx.options import OnnxInt8Options, OnnxOptions
from keras_bn_ext.export.target import Capabilities, Conversion, RunResult, Target

__all__ = ["ONNX", "OnnxTarget"]


# external_data: the model is always staged as a bundle (it may write OUT.onnx.data).
class OnnxTarget(Target, name="onnx", suffix=".onnx", runtime="onnxruntime",
                 capabilities=Capabilities(fp16=True, int8=True, external_data=True, dynamic_batch=True,
                                           learned_int8=True)):
    """ONNX files from tf2onnx, verified on onnxruntime (`OnnxOptions`); INT8 through
    onnxruntime's static quantization (`OnnxInt8Options`)."""

    def __init__(self, options: OnnxOptions = OnnxOptions(), int8: OnnxInt8Options = OnnxInt8Options()):
        self.options, self.int8 = options, int8

    def int8_quantizer(self, model, data, options, work):
        from keras_bn_ext.export.onnx.int8 import OnnxQuantizer
        from keras_bn_ext.qat.model import is_qat_model

        if is_qat_model(model):  # its ranges are learned: they are written, not calibrated
            from keras_bn_ext.export.onnx.qat import QatOnnxQuantizer

            return QatOnnxQuantizer(self.options, model, data, options, work)

        return OnnxQuantizer(self.options, self.int8, model, data, options, work)

    def check_options(self, options) -> None:
        super().check_options(options)
        if options.fp16 and self.options.external_data:
            raise ValueError("float16 conversion of a model with external data is not supported. "
                             "Received: fp16=True, external_data=True")

    def convert(self, model, path, options) -> Conversion:
        from keras_bn_ext.export.onnx.convert import export_onnx

        report = export_onnx(model, path, options=options, onnx=self.options, atomic=False)
        return Conversion(path=str(path), inputs=report.inputs, output_names=report.outputs, fold=report.fold,
                          precision="float16 weights, float32 inputs/outputs" if options.fp16 else "float32",
                          batch_size=options.batch_size, op_counts=report.op_counts,
                          companions=[report.external_data] if report.external_data else [], detail=report)

    def run(self, path, batches, *, keras_names, repeats=0) -> RunResult:
        from keras_bn_ext.export.onnx.verify import in_keras_order, run_onnxruntime

        got, meta = run_onnxruntime(path, batches, provider=self.options.provider, repeats=repeats)
        latency = {str(bs): ms for bs, ms in meta.get("latency_ms", {}).items()}
        return RunResult(outputs=in_keras_order(got, meta, list(keras_names)), runtime="onnxruntime",
                         runtime_version=meta.get("version", ""), device=meta["provider"], latency_ms=latency)

    def verify(self, model, path, conversion, options):
        from keras_bn_ext.export.onnx.verify import verify_onnx
        from keras_bn_ext.export.verify import Verification

        atol, rtol = options.tolerances
        report = verify_onnx(model, path, options=dataclasses.replace(options, atol=atol, rtol=rtol), onnx=self.options)
        latency = {str(bs): row["onnxruntime"] for bs, row in report.latency_ms.items()}
        return Verification(comparison=report.comparison, runtime="onnxruntime",
                            runtime_version=report.onnxruntime_version, device=report.provider,
                            batch_sizes=report.batch_sizes, latency_ms=latency, exact=report.exact, detail=report)

    def report_detail(self, conversion, verification) -> dict:
        e, v = conversion.detail, verification.detail
        return {
            "opset": e.opset,
            "conversion": e.conversion,
            "conversion_fallback": e.conversion_fallback,
            "external_data": conversion.companions[0] if conversion.companions else None,
            "external_data_bytes": e.external_data_bytes,
            "guards": e.guards,
            "provider": v.provider,
            "requested_provider": v.requested,
            "fallback_reason": v.fallback_reason,
            "keras_latency_ms": {str(bs): row["keras_tf_function"] for bs, row in v.latency_ms.items()},
            "unoptimized_max_rel_err": v.unoptimized.max_rel_err if v.unoptimized else None,
            "diagnosis": v.diagnosis,
            "placement": v.placement.to_dict() if v.placement else None,
        }


ONNX = OnnxTarget()
