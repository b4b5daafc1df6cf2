"""LiteRT (TFLite), the second target: convert with TensorFlow's LiteRT converter
(`convert`), run on ai-edge-litert's interpreter in a child process (`_litert_worker`);
`target.LITERT` is the registered unit the float driver (`export.driver`) runs, `int8`
the full-integer export."""

from keras_bn_ext._lazy import lazy_attributes

_EXPORTS = {
    "LITERT": "keras_bn_ext.export.litert.target",
    "convert_litert_file": "keras_bn_ext.export.litert.convert",
    "LiteRTQuantizer": "keras_bn_ext.export.litert.int8",
    "QatLiteRTQuantizer": "keras_bn_ext.export.litert.qat",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS)
