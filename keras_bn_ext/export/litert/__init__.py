"""LiteRT (TFLite), the second target: convert with TensorFlow's LiteRT converter
(`convert`), run on ai-edge-litert's interpreter in a child process (`_litert_worker`),
verify against the Keras model (`verify`). Folding, the data checks and the comparison
are the ONNX target's (`folding`, `data`, `compare`): a target is a converter plus a runner."""

from keras_bn_ext._lazy import lazy_attributes

_EXPORTS = {
    "LiteRTExportReport": "keras_bn_ext.export.litert.convert",
    "export_litert": "keras_bn_ext.export.litert.convert",
    "LiteRTVerification": "keras_bn_ext.export.litert.verify",
    "verify_litert": "keras_bn_ext.export.litert.verify",
    "run_litert": "keras_bn_ext.export.litert.verify",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS)
