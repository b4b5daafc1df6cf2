"""Quantization-aware training with BatchNormalization folded in training.

- `quantize_model(model, calibration=...)`: the QAT twin of a trained model (`qat.model`).
- `QuantizedConv`: a conv/dense layer and its BN, trained with folded fake-quantized weights.
- `ActivationQuantizer`: one fake-quantized activation tensor.
"""

from keras_bn_ext._lazy import lazy_attributes

_EXPORTS = {
    "ActivationQuantizer": "keras_bn_ext.qat.activation",
    "QuantizedConv": "keras_bn_ext.qat.conv",
    "quantize_model": "keras_bn_ext.qat.model",
    "is_qat_model": "keras_bn_ext.qat.model",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS)
