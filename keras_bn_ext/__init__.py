"""keras-bn-ext: batch normalization for Keras 3 users who ship their models.

- `BatchNormalization`: a from-scratch BN layer, interchangeable with Keras's.
- `reference.batch_norm`: the numpy reference it is tested against.
- `fold_batchnorms`: fold trained BN into conv/dense weights; `compare_models` proves it.
- `export_onnx` / `verify_onnx`: ONNX through tf2onnx, checked on onnxruntime.
- `recalibrate_batchnorms`: re-estimate BN statistics from data (exact, or update_bn's running).
- `testing`: make BN statistics non-trivial, count BNs, to check a pipeline.

Every name is imported on first use (PEP 562), so `import keras_bn_ext` imports
neither Keras nor TensorFlow, and `from keras_bn_ext import BatchNormalization`
imports Keras but not tf2onnx, onnx or onnxruntime. The layer is registered with Keras
as soon as Keras is imported, so saved models that use it load after
`import keras_bn_ext`.
"""

from keras_bn_ext._lazy import lazy_attributes
from keras_bn_ext._registration import register_with_keras

__version__ = "0.1.0"

_EXPORTS = {
    "BatchNormalization": "keras_bn_ext.layers.batch_normalization",
    "ComparisonReport": "keras_bn_ext.compare",
    "compare_models": "keras_bn_ext.compare",
    "FoldReport": "keras_bn_ext.folding.fold",
    "fold_batchnorms": "keras_bn_ext.folding.fold",
    "ExportOptions": "keras_bn_ext.export.options",
    "ExportReport": "keras_bn_ext.export.onnx.convert",
    "OnnxOptions": "keras_bn_ext.export.onnx.options",
    "export_onnx": "keras_bn_ext.export.onnx.convert",
    "VerificationReport": "keras_bn_ext.export.onnx.verify",
    "verify_onnx": "keras_bn_ext.export.onnx.verify",
    "lenet_bn": "keras_bn_ext.lenet",
    "RecalibrationReport": "keras_bn_ext.recalibration.statistics",
    "recalibrate_batchnorms": "keras_bn_ext.recalibration.statistics",
}

__all__ = sorted(_EXPORTS) + ["__version__"]
__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS)

register_with_keras()
