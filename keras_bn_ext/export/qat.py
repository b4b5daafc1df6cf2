"""What every target's INT8 file of a quantization-aware model starts from: the QAT model
(`keras_bn_ext.qat`) rebuilt as a plain Keras model a converter reads.

Each `QuantizedConv` becomes its wrapped layer holding the folded kernel *on its
quantization grid* and the folded bias; each `ActivationQuantizer` becomes TensorFlow's
FakeQuantWithMinMaxArgs on the range of its grid. tf2onnx writes that marker as a
QuantizeLinear/DequantizeLinear pair (`export.onnx.qat`); TensorFlow's LiteRT converter reads
it as the quantization of that tensor (`export.litert.qat`). No calibration: the ranges are
the model's.
"""

from __future__ import annotations

import keras
import numpy as np

from keras_bn_ext.errors import ExportError

__all__ = ["export_model", "per_channel_of", "weight_qmax_of"]


def _qat_layers():
    from keras_bn_ext.qat.activation import ActivationQuantizer
    from keras_bn_ext.qat.conv import QuantizedConv

    return ActivationQuantizer, QuantizedConv


class _FakeQuantMarker(keras.layers.Layer):
    """TensorFlow's FakeQuantWithMinMaxArgs on the grid (scale, zero point): for the
    converters only (never saved)."""

    def __init__(self, scale: float, zero_point: int, **kwargs):
        super().__init__(**kwargs)
        self.scale, self.zero_point = float(scale), int(zero_point)

    def call(self, inputs):
        import tensorflow as tf

        return tf.quantization.fake_quant_with_min_max_args(
            inputs, min=-self.zero_point * self.scale, max=(255 - self.zero_point) * self.scale, num_bits=8)


class _TensorGridKernel(keras.layers.Layer):
    """A plain layer whose grid kernel passes through FakeQuantWithMinMaxArgs on its one
    per-tensor grid ([-qmax, qmax] steps of `scale`, narrow range): a converter that would
    otherwise pick one weight scale per channel takes this one (never saved). `plain` lends
    only its arithmetic (strides, padding, activation), never its own weights."""

    def __init__(self, plain, weights, qmax: int, **kwargs):
        super().__init__(**kwargs)
        self.plain, self.values, self.qmax = plain, weights, int(qmax)
        self.scale = float(np.max(np.abs(weights[0]))) / self.qmax or 1.0

    def build(self, input_shape):
        self.kernel = self.add_weight(name="kernel", shape=self.values[0].shape, trainable=False)
        self.bias = self.add_weight(name="bias", shape=self.values[1].shape, trainable=False)
        self.kernel.assign(self.values[0])
        self.bias.assign(self.values[1])

    def call(self, inputs):
        import tensorflow as tf

        from keras_bn_ext.qat.conv import apply_kernel

        limit = self.qmax * self.scale
        kernel = tf.quantization.fake_quant_with_min_max_args(self.kernel, min=-limit, max=limit,
                                                              num_bits=8, narrow_range=True)
        return self.plain.activation(apply_kernel(self.plain, inputs, kernel) + self.bias)


def export_model(qat: keras.Model, *, markers: bool = True, weight_markers: bool = False) -> keras.Model:
    """The plain Keras model the file is converted from (`markers=False`: without the
    activation quantization, the float twin the latency is compared with;
    `weight_markers`: per-tensor grid kernels behind their FakeQuant, for LiteRT's
    converter, whose own weight quantization is per channel)."""
    from keras_bn_ext.rebuild import RebuildPlan, rebuild

    ActivationQuantizer, QuantizedConv = _qat_layers()

    def replacement(op):
        if isinstance(op, ActivationQuantizer):
            if not markers:
                return lambda x, *a, **k: x
            scale, zero_point = op.quantization()
            return _FakeQuantMarker(scale, zero_point, name=op.name)
        plain = type(op.inner).from_config({**op.plain_layer_config(), "name": op.name})
        weights = op.folded_weights()
        if markers and weight_markers and not op.per_channel:
            return _TensorGridKernel(plain, weights, op.qmax, name=op.name)

        def call(x, *args, **kwargs):
            first = not plain.built
            y = plain(x)
            if first:
                plain.set_weights(weights)
            return y

        return call

    plan = RebuildPlan()
    for layer in qat.layers:
        if isinstance(layer, (ActivationQuantizer, QuantizedConv)):
            plan.replace[id(layer)] = replacement
    return rebuild(qat, plan)


def weight_qmax_of(qat: keras.Model) -> int:
    """The one weight grid's largest magnitude (127, 63 or 7) of the QAT model's layers."""
    _, QuantizedConv = _qat_layers()
    found = {layer.qmax for layer in qat.layers if isinstance(layer, QuantizedConv)}
    if len(found) != 1:
        raise ExportError(f"the QAT model's layers use different weight grids ({sorted(found)}); "
                          "quantize_model gives every layer the same")
    return found.pop()


def per_channel_of(qat: keras.Model) -> bool:
    """Whether every quantized layer has one weight scale per output channel."""
    _, QuantizedConv = _qat_layers()
    return all(layer.per_channel for layer in qat.layers if isinstance(layer, QuantizedConv))
