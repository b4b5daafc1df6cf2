"""`ActivationQuantizer`: one fake-quantized activation tensor of a QAT model."""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from keras_bn_ext.qat.quantizers import activation_params_np, fake_quant_activation

__all__ = ["ActivationQuantizer"]


@keras.saving.register_keras_serializable(package="keras_bn_ext")
class ActivationQuantizer(keras.layers.Layer):
    """Quantizes its input to uint8 on a learned range and dequantizes it (straight-through
    gradients; see `qat.quantizers`). The export writes a QuantizeLinear/DequantizeLinear
    pair with exactly this scale and zero point at this tensor.

    Args:
        unsigned: The input is never negative (it follows a ReLU): the range's lower end is
            fixed at 0, so the zero point is 0 and the runtime drops the ReLU into the
            quantization (onnxruntime's ReluQuantFusion).
        **kwargs: Base layer keyword arguments (`name`, `dtype`).

    Call arguments:
        inputs: Any float tensor.
    """

    def __init__(self, *, unsigned: bool = False, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(unsigned, bool):
            raise ValueError(f"unsigned must be a bool. Received: unsigned={unsigned!r}")
        self.unsigned = unsigned
        self.observing = False  # calibration: record the range, pass the input through
        self.observed: list[tuple[float, float]] = []
        self.supports_masking = True

    def build(self, input_shape):
        self.min_value = self.add_weight(name="min_value", shape=(), initializer="zeros",
                                         trainable=not self.unsigned)
        self.max_value = self.add_weight(name="max_value", shape=(), initializer=keras.initializers.Constant(6.0))

    def call(self, inputs):
        if self.observing:
            values = ops.convert_to_numpy(inputs)
            self.observed.append((float(np.min(values)), float(np.max(values))))
            return inputs
        minimum = 0.0 if self.unsigned else self.min_value
        return fake_quant_activation(inputs, minimum, self.max_value)

    def compute_output_shape(self, input_shape):
        return input_shape

    def set_range(self, minimum: float, maximum: float) -> None:
        """Start from this range (calibration)."""
        if not (np.isfinite(minimum) and np.isfinite(maximum)):  # min()/max() below would keep a NaN
            raise ValueError(f"'{self.name}' observed a non-finite range. Received: minimum={minimum}, "
                             f"maximum={maximum}")
        self.min_value.assign(0.0 if self.unsigned else min(float(minimum), 0.0))
        self.max_value.assign(max(float(maximum), 0.0))

    def quantization(self) -> tuple[np.float32, int]:
        """(scale, zero point) the runtime must use: the numpy twin of what `call` computes."""
        minimum = 0.0 if self.unsigned else float(ops.convert_to_numpy(self.min_value))
        return activation_params_np(minimum, float(ops.convert_to_numpy(self.max_value)))

    def get_config(self):
        return {**super().get_config(), "unsigned": self.unsigned}
