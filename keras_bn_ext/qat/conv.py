"""`QuantizedConv`: a conv/dense layer, and the BatchNormalization after it, trained as the
runtime will run them: one layer with folded, fake-quantized weights.

With a BN (Krishnamoorthi 2018, section 3.2; Jacob et al. 2018, section 3.2): the kernel
is folded with the *moving* standard deviation, w_f = w * gamma / sigma, and quantized; in
training the output is corrected to the batch's statistics,

    y = conv(x, q(w_f)) * sigma / sigma_B + beta - gamma * (mu_B - b) / sigma_B,

which is BN(conv(x, w) + b) with batch statistics when q is the identity, while the moving
statistics are updated as the BN layer would. The batch statistics mu_B, sigma_B are those
of conv(x, q(w_f)) * sigma / gamma + b, the quantized layer's output brought back to the
float layer's units (PyTorch's ConvBn QAT does the same), computed per channel from the
moments of conv(x, q(w_f)): the layer runs one convolution, not a second float one, which
would nearly double a training step (the float layer's statistics differ only by the
weights' rounding). A channel with gamma = 0 outputs beta whatever its statistics: they are
left as they are. After `bn_freeze_after` training steps the statistics freeze and training
computes what inference computes,

    y = conv(x, q(w_f)) + beta + gamma * (b - mu) / sigma,

which is exactly the folded layer the export writes.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from keras_bn_ext.layers.batch_normalization import BatchNormalization
from keras_bn_ext.qat.options import WEIGHT_BITS
from keras_bn_ext.qat.quantizers import fake_quant_weight, weight_qmax, weight_scale

__all__ = ["QuantizedConv", "SUPPORTED", "apply_kernel"]

# The layer classes a QuantizedConv wraps, and the kernel axes that hold its output channels
# (-1: the last; -2: depthwise kernels (..., C, M), whose output channel is c * M + m).
SUPPORTED = {
    keras.layers.Dense: 1,
    keras.layers.Conv1D: 1,
    keras.layers.Conv2D: 1,
    keras.layers.Conv3D: 1,
    keras.layers.DepthwiseConv1D: 2,
    keras.layers.DepthwiseConv2D: 2,
}


def apply_kernel(layer, x, kernel):
    """What `layer` (a SUPPORTED kind) computes on `x` with `kernel` in place of its own,
    before its bias and activation."""
    if isinstance(layer, keras.layers.Dense):
        return ops.matmul(x, kernel)
    if isinstance(layer, (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)):
        return ops.depthwise_conv(x, kernel, strides=layer.strides, padding=layer.padding,
                                  data_format=layer.data_format, dilation_rate=layer.dilation_rate)
    return layer.convolution_op(x, kernel)


@keras.saving.register_keras_serializable(package="keras_bn_ext")
class QuantizedConv(keras.layers.Layer):
    """A Dense, Conv or DepthwiseConv layer (linear activation) with, optionally, the
    BatchNormalization that follows it, computing with fake-quantized folded weights.

    Args:
        layer: The wrapped layer's config (`keras.saving.serialize_keras_object`).
        batchnorm: The BN's config (this package's `BatchNormalization`), or None.
        weight_bits: 8 or 4 (symmetric, narrow range).
        reduce_range: 8-bit weights on 7 bits ([-63, 63]), for CPUs without VNNI.
        per_channel: One weight scale per output channel (else one for the tensor).
        bn_freeze_after: Training steps after which the BN statistics freeze (None: never).
        **kwargs: Base layer keyword arguments (`name`, `dtype`).

    Call arguments:
        inputs: The wrapped layer's input.
        training: Batch statistics and moving-statistics updates (until the freeze).
    """

    def __init__(self, layer: dict, batchnorm: dict | None = None, *, weight_bits: int = 8, per_channel: bool = True,
                 reduce_range: bool = False, bn_freeze_after: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if weight_bits not in WEIGHT_BITS:
            raise ValueError(f"weight_bits must be one of {WEIGHT_BITS}. Received: weight_bits={weight_bits!r}")
        if not isinstance(per_channel, bool):
            raise ValueError(f"per_channel must be a bool. Received: per_channel={per_channel!r}")
        if not isinstance(reduce_range, bool):
            raise ValueError(f"reduce_range must be a bool. Received: reduce_range={reduce_range!r}")
        self.reduce_range = reduce_range
        if bn_freeze_after is not None and (not isinstance(bn_freeze_after, int) or bn_freeze_after < 0):
            raise ValueError("bn_freeze_after must be a non-negative integer or None. "
                             f"Received: bn_freeze_after={bn_freeze_after!r}")
        self.layer_config, self.batchnorm_config = layer, batchnorm
        self.weight_bits, self.per_channel, self.bn_freeze_after = weight_bits, per_channel, bn_freeze_after
        self.inner = keras.saving.deserialize_keras_object(layer)
        kind = type(self.inner)
        if kind not in SUPPORTED:
            raise ValueError(f"layer must be one of {sorted(k.__name__ for k in SUPPORTED)}. "
                             f"Received: layer={kind.__name__}")
        if getattr(self.inner, "data_format", "channels_last") != "channels_last":
            raise ValueError("only channels_last layers are supported. "
                             f"Received: data_format={self.inner.data_format!r}")
        if batchnorm is not None and self.inner.activation is not keras.activations.linear:
            raise ValueError(f"a layer fused with its BN must have a linear activation. Received: "
                             f"activation={keras.activations.serialize(self.inner.activation)!r}")
        self.channel_axes = SUPPORTED[kind]
        self.batchnorm = BatchNormalization.from_config(batchnorm) if batchnorm is not None else None

    def build(self, input_shape):
        if not self.inner.built:  # (deserializing its config with a build_config builds it)
            self.inner.build(input_shape)
        if self.batchnorm is not None and not self.batchnorm.built:
            self.batchnorm.build(self.inner.compute_output_shape(input_shape))
        if self.batchnorm is not None:
            self.steps = self.add_weight(name="steps", shape=(), initializer="zeros", trainable=False)

    # -- the arithmetic -------------------------------------------------------------------

    def _apply(self, x, kernel):
        return apply_kernel(self.inner, x, kernel)

    def _per_channel(self, values, kernel):
        """`values` (one per output channel) shaped to multiply `kernel`."""
        shape = ops.shape(kernel)
        if self.channel_axes == 2:  # (..., C, M)
            return ops.reshape(values, (shape[-2], shape[-1]))
        return values

    def _quantized(self, kernel):
        axes = None
        if self.per_channel:
            axes = tuple(range(len(kernel.shape) - self.channel_axes))
        return fake_quant_weight(kernel, weight_scale(kernel, axes, self.qmax), self.qmax)

    def _folding(self):
        """(scale per output channel, shift per output channel) of the BN in inference."""
        bn = self.batchnorm
        sigma = ops.sqrt(ops.cast(bn.moving_variance, "float32") + bn.epsilon)
        gamma = ops.cast(bn.gamma, "float32") if bn.scale else ops.ones_like(sigma)
        beta = ops.cast(bn.beta, "float32") if bn.center else ops.zeros_like(sigma)
        return sigma, gamma, beta

    def call(self, inputs, training=None):
        x = ops.cast(inputs, "float32")
        kernel = ops.cast(self.inner.kernel, "float32")
        bias = ops.cast(self.inner.bias, "float32") if self.inner.use_bias else None
        if self.batchnorm is None:
            y = self._apply(x, self._quantized(kernel))
            return self.inner.activation(y + bias if bias is not None else y)
        bn = self.batchnorm
        sigma, gamma, beta = self._folding()
        b = bias if bias is not None else ops.zeros_like(sigma)
        factor = gamma / sigma
        folded = self._quantized(kernel * self._per_channel(factor, kernel))
        y = self._apply(x, folded)
        shift = beta + gamma * (b - ops.cast(bn.moving_mean, "float32")) / sigma
        if not (training and bn.trainable):
            return y + shift
        # Batch statistics of the layer's output in the float layer's units, y / factor + b,
        # from y's own (synchronized across replicas when the BN is): per channel, so no pass
        # over the tensor. The moving statistics are updated until the freeze.
        live = ops.cast(ops.not_equal(factor, 0.0), "float32")  # gamma = 0: nothing to measure
        inverse = live / (factor + (1.0 - live))
        mean_y, variance_y = bn.batch_moments(y)
        mean, variance = mean_y * inverse + b, variance_y * ops.square(inverse)
        self.steps.assign_add(1.0)
        frozen = 0.0 if self.bn_freeze_after is None else ops.cast(self.steps > self.bn_freeze_after, "float32")
        decay = 1.0 - (1.0 - frozen) * (1.0 - bn.momentum) * live
        bn.moving_mean.assign(ops.cast(bn.moving_mean, "float32") * decay + mean * (1.0 - decay))
        bn.moving_variance.assign(ops.cast(bn.moving_variance, "float32") * decay + variance * (1.0 - decay))
        sigma_batch = ops.sqrt(variance + bn.epsilon)
        # Both forms are affine in y per channel: the output is one multiply-add over it.
        multiplier, offset = sigma / sigma_batch, beta - gamma * (mean - b) / sigma_batch
        if self.bn_freeze_after is not None:
            multiplier = frozen + (1.0 - frozen) * multiplier
            offset = frozen * shift + (1.0 - frozen) * offset
        return y * multiplier + offset

    def compute_output_shape(self, input_shape):
        return self.inner.compute_output_shape(input_shape)

    # -- what the export writes -------------------------------------------------------------

    def folded_weights(self) -> list[np.ndarray]:
        """[kernel on its quantization grid, float bias]: what the runtime holds, computed
        by the same operations as inference (so the same float32 bits)."""
        kernel = ops.cast(self.inner.kernel, "float32")
        bias = ops.cast(self.inner.bias, "float32") if self.inner.use_bias else None
        if self.batchnorm is None:
            out = ops.shape(kernel)[-1] if self.channel_axes == 1 else ops.shape(kernel)[-2] * ops.shape(kernel)[-1]
            b = bias if bias is not None else ops.zeros((out,), "float32")
            return [ops.convert_to_numpy(self._quantized(kernel)), ops.convert_to_numpy(b)]
        sigma, gamma, beta = self._folding()
        b = bias if bias is not None else ops.zeros_like(sigma)
        folded = self._quantized(kernel * self._per_channel(gamma / sigma, kernel))
        shift = beta + gamma * (b - ops.cast(self.batchnorm.moving_mean, "float32")) / sigma
        return [ops.convert_to_numpy(folded), ops.convert_to_numpy(shift)]

    def plain_layer_config(self) -> dict:
        """The wrapped layer's config with a bias: the export's plain layer."""
        config = dict(self.inner.get_config())
        config["use_bias"] = True
        return config

    @property
    def qmax(self) -> int:
        return weight_qmax(self.weight_bits, reduce_range=self.reduce_range)

    def get_config(self):
        return {**super().get_config(), "layer": self.layer_config, "batchnorm": self.batchnorm_config,
                "weight_bits": self.weight_bits, "per_channel": self.per_channel, "reduce_range": self.reduce_range,
                "bn_freeze_after": self.bn_freeze_after}
