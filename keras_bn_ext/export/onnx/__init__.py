"""ONNX: convert with tf2onnx (`convert`), verify on onnxruntime in a child process
(`verify`, `_ort_worker`); `options` holds the opsets, providers and tolerances that the
library and the CLI share (importable without Keras)."""

from keras_bn_ext._lazy import lazy_attributes

_EXPORTS = {
    "ExportReport": "keras_bn_ext.export.onnx.convert",
    "export_onnx": "keras_bn_ext.export.onnx.convert",
    "VerificationReport": "keras_bn_ext.export.onnx.verify",
    "verify_onnx": "keras_bn_ext.export.onnx.verify",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS)
