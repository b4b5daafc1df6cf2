"""keras-bn-ext: batch normalization for Keras 3 users who ship their models.

- `BatchNormalization`: a from-scratch BN layer, interchangeable with Keras's.
- `reference.batch_norm`: the numpy reference it is tested against.
- `fold_batchnorms`: fold trained BN into conv/dense weights; `compare_models` proves it.
- `export_onnx` / `verify_onnx`: ONNX through tf2onnx, checked on onnxruntime.
"""

from keras_bn_ext._native_log import captured_native_stderr, running_as_cli

# The console scripts promise one-line errors; TensorFlow's import prints C++ log
# lines to fd 2. Only when running as bn-fold / bn-export-onnx are they kept out.
with captured_native_stderr(running_as_cli()):
    from keras_bn_ext.batch_normalization import BatchNormalization
    from keras_bn_ext.compare import ComparisonReport, compare_models
    from keras_bn_ext.fold import FoldReport, fold_batchnorms
    from keras_bn_ext.lenet import lenet_bn
    from keras_bn_ext.onnx_export import ExportReport, export_onnx
    from keras_bn_ext.onnx_verify import VerificationReport, verify_onnx

__version__ = "0.1.0"

__all__ = [
    "BatchNormalization",
    "ComparisonReport",
    "ExportReport",
    "FoldReport",
    "VerificationReport",
    "compare_models",
    "export_onnx",
    "fold_batchnorms",
    "lenet_bn",
    "verify_onnx",
    "__version__",
]
