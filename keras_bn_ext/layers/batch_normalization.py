"""`keras_bn_ext.BatchNormalization`, written on `keras.ops` alone."""

from __future__ import annotations

import keras
from keras import constraints, initializers, ops, regularizers

from keras_bn_ext.layers._distribute import cross_replica_sum

__all__ = ["BatchNormalization"]

_UNSET = object()


@keras.saving.register_keras_serializable(package="keras_bn_ext")
class BatchNormalization(keras.layers.Layer):
    """Batch normalization, from the textbook's equations, on `keras.ops` only.

    In training, each channel is normalized with the mean and the biased
    variance of the batch, taken over every axis except `axis`, then scaled by
    `gamma` and shifted by `beta`; the moving statistics are updated as
    `new = decay * old + (1 - decay) * batch`. In inference the moving
    statistics are used instead.

    The defaults are the seed notebook's (`decay=0.9`, `epsilon=1e-5`).
    Everywhere else the layer matches `keras.layers.BatchNormalization`: the
    same arguments, the same weights in the same order (gamma, beta,
    moving_mean, moving_variance), so `get_weights()` / `set_weights()` swap
    with `keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)`.

    **Freezing.** As in Keras, `layer.trainable = False` means inference: the
    moving statistics normalize the inputs even when called with
    `training=True`, and nothing is updated. Fine-tuning a model with frozen
    BN layers therefore keeps their statistics as trained.

    **Mixed precision.** float16/bfloat16 inputs are normalized in float32;
    the output is in the layer's compute dtype; weights and statistics stay
    float32.

    **Several devices.** With `synchronized=True` under a `tf.distribute`
    strategy (`MirroredStrategy`, `MultiWorkerMirroredStrategy`), the batch
    statistics are taken over the global batch: the sum, the sum of squares
    and the count are all-reduced across replicas. Under JAX's
    `keras.distribution` a batch is one global array already, so the
    statistics are global either way.

    Args:
        axis: Integer, the channel axis (negative allowed). Use `axis=1` after
            a `data_format="channels_first"` convolution.
        decay: Float in [0, 1), weight of the old moving statistics. The seed's
            name; default 0.9.
        epsilon: Positive float added to the variance. Default 1e-5.
        center: If True, add the offset `beta`.
        scale: If True, multiply by the scale `gamma`.
        beta_initializer: Initializer for `beta`.
        gamma_initializer: Initializer for `gamma`.
        moving_mean_initializer: Initializer for the moving mean.
        moving_variance_initializer: Initializer for the moving variance.
        beta_regularizer: Optional regularizer for `beta`.
        gamma_regularizer: Optional regularizer for `gamma`.
        beta_constraint: Optional constraint for `beta`.
        gamma_constraint: Optional constraint for `gamma`.
        synchronized: If True, compute batch statistics across replicas
            under `tf.distribute` (see above).
        momentum: Keras's name for `decay`. Give one of the two, or both with
            the same value.
        **kwargs: Base layer keyword arguments (`name`, `dtype`, `trainable`).

    Call arguments:
        inputs: Input tensor of any rank.
        training: Python boolean. True: normalize with the batch statistics
            and update the moving ones (unless the layer is frozen).
            False or None: normalize with the moving statistics.
        mask: Optional boolean tensor of the input's shape without the channel
            axis. Masked-out positions take no part in the batch statistics.
    """

    def __init__(
        self,
        axis: int = -1,
        decay: float = _UNSET,
        epsilon: float = 1e-5,
        center: bool = True,
        scale: bool = True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        synchronized: bool = False,
        momentum: float = _UNSET,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise ValueError(
                "Argument `axis` must be a single integer axis. "
                f"Received: axis={axis!r}"
            )
        self.axis = int(axis)
        if decay is not _UNSET and momentum is not _UNSET and float(decay) != float(
            momentum
        ):
            raise ValueError(
                "Arguments `decay` and `momentum` name the same value; give one, "
                f"or both equal. Received: decay={decay}, momentum={momentum}"
            )
        value = momentum if momentum is not _UNSET else decay
        self.momentum = 0.9 if value is _UNSET else value
        if not 0.0 < float(epsilon):
            raise ValueError(
                f"Argument `epsilon` must be positive. Received: epsilon={epsilon}"
            )
        self.epsilon = float(epsilon)
        self.center = bool(center)
        self.scale = bool(scale)
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.moving_mean_initializer = initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = initializers.get(
            moving_variance_initializer
        )
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)
        self.beta_constraint = constraints.get(beta_constraint)
        self.gamma_constraint = constraints.get(gamma_constraint)
        self.synchronized = bool(synchronized)
        self.supports_masking = True
        self.gamma = None
        self.beta = None
        self.moving_mean = None
        self.moving_variance = None

    # -- the two names of one value -------------------------------------
    @property
    def momentum(self) -> float:
        return self._momentum

    @momentum.setter
    def momentum(self, value) -> None:
        value = float(value)
        if not 0.0 <= value < 1.0:
            raise ValueError(
                "Argument `momentum` (`decay`) must be in [0, 1). "
                f"Received: momentum={value}"
            )
        self._momentum = value

    @property
    def decay(self) -> float:
        """The seed's name for `momentum`."""
        return self.momentum

    @decay.setter
    def decay(self, value) -> None:
        self.momentum = value

    @property
    def running_mean(self):
        """Read-only alias of `moving_mean` (the seed's name)."""
        return self.moving_mean

    @property
    def running_var(self):
        """Read-only alias of `moving_variance` (the seed's name)."""
        return self.moving_variance

    # -- build -----------------------------------------------------------
    def _channel_axis(self, rank: int) -> int:
        if not -rank <= self.axis < rank:
            raise ValueError(
                f"Argument `axis` is out of range for inputs of rank {rank}. "
                f"Received: axis={self.axis}"
            )
        return self.axis % rank

    def build(self, input_shape):
        rank = len(input_shape)
        channel_axis = self._channel_axis(rank)
        channels = input_shape[channel_axis]
        if channels is None:
            raise ValueError(
                "The channel axis of the inputs must have a known size. "
                f"Received: input_shape={tuple(input_shape)}, axis={self.axis}"
            )
        shape = (channels,)
        if self.scale:
            self.gamma = self.add_weight(
                shape=shape,
                name="gamma",
                initializer=self.gamma_initializer,
                regularizer=self.gamma_regularizer,
                constraint=self.gamma_constraint,
                trainable=True,
                autocast=False,
            )
        if self.center:
            self.beta = self.add_weight(
                shape=shape,
                name="beta",
                initializer=self.beta_initializer,
                regularizer=self.beta_regularizer,
                constraint=self.beta_constraint,
                trainable=True,
                autocast=False,
            )
        self.moving_mean = self.add_weight(
            shape=shape,
            name="moving_mean",
            initializer=self.moving_mean_initializer,
            trainable=False,
            autocast=False,
        )
        self.moving_variance = self.add_weight(
            shape=shape,
            name="moving_variance",
            initializer=self.moving_variance_initializer,
            trainable=False,
            autocast=False,
        )
        self.input_spec = keras.layers.InputSpec(
            ndim=rank, axes={channel_axis: channels}
        )
        self._reduction_axes = [i for i in range(rank) if i != channel_axis]
        self._broadcast_shape = [1] * rank
        self._broadcast_shape[channel_axis] = channels

    def compute_output_shape(self, input_shape):
        self._channel_axis(len(input_shape))
        return tuple(input_shape)

    # -- call ------------------------------------------------------------
    def _check_mask(self, inputs, mask):
        rank = len(inputs.shape)
        channel_axis = self.axis % rank
        expected = tuple(d for i, d in enumerate(inputs.shape) if i != channel_axis)
        shape = tuple(mask.shape)
        fits = len(shape) == rank - 1 and all(
            a is None or b is None or a == b for a, b in zip(shape, expected)
        )
        if not fits:
            raise ValueError(
                "The mask must have the inputs' shape without the channel axis "
                f"{expected}. Received: mask.shape={shape}, "
                f"inputs.shape={tuple(inputs.shape)}"
            )
        return ops.expand_dims(ops.cast(mask, inputs.dtype), channel_axis)

    def _moments(self, x, weights):
        axes = self._reduction_axes
        if self.synchronized:
            ones = ops.ones_like(x) if weights is None else ops.broadcast_to(
                weights, ops.shape(x)
            )
            xw = x * ones
            total, total_sq, count = cross_replica_sum(
                [
                    ops.sum(xw, axes),
                    ops.sum(xw * x, axes),
                    ops.sum(ones, axes),
                ]
            )
            count = ops.maximum(count, 1.0)
            mean = total / count
            variance = ops.maximum(total_sq / count - ops.square(mean), 0.0)
            return mean, variance
        if weights is None:
            mean = ops.mean(x, axes)
            centred = x - ops.reshape(ops.stop_gradient(mean), self._broadcast_shape)
            return mean, ops.mean(ops.square(centred), axes)
        weights = ops.broadcast_to(weights, ops.shape(x))
        count = ops.maximum(ops.sum(weights, axes), 1.0)
        mean = ops.sum(x * weights, axes) / count
        centred = x - ops.reshape(ops.stop_gradient(mean), self._broadcast_shape)
        return mean, ops.sum(ops.square(centred) * weights, axes) / count

    def call(self, inputs, training=None, mask=None):
        # float16/bfloat16 overflow easily in the statistics: work in float32.
        work_dtype = keras.backend.result_type(inputs.dtype, "float32")
        x = ops.cast(inputs, work_dtype)
        weights = None if mask is None else self._check_mask(x, mask)

        if training and self.trainable:
            mean, variance = self._moments(x, weights)
            decay = self.momentum
            self.moving_mean.assign(
                ops.cast(self.moving_mean, work_dtype) * decay + mean * (1.0 - decay)
            )
            self.moving_variance.assign(
                ops.cast(self.moving_variance, work_dtype) * decay
                + variance * (1.0 - decay)
            )
        else:
            mean = ops.cast(self.moving_mean, work_dtype)
            variance = ops.cast(self.moving_variance, work_dtype)

        # y = (x - mean) * inv + beta with inv = gamma / sqrt(var + eps),
        # computed as x * inv + (beta - mean * inv): one multiply-add per element.
        inv = ops.rsqrt(variance + self.epsilon)
        if self.scale:
            inv = inv * ops.cast(self.gamma, work_dtype)
        shift = -mean * inv
        if self.center:
            shift = shift + ops.cast(self.beta, work_dtype)
        outputs = x * ops.reshape(inv, self._broadcast_shape) + ops.reshape(
            shift, self._broadcast_shape
        )
        return ops.cast(outputs, self.compute_dtype)

    def get_config(self):
        config = {
            "axis": self.axis,
            "decay": self.momentum,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": initializers.serialize(self.beta_initializer),
            "gamma_initializer": initializers.serialize(self.gamma_initializer),
            "moving_mean_initializer": initializers.serialize(
                self.moving_mean_initializer
            ),
            "moving_variance_initializer": initializers.serialize(
                self.moving_variance_initializer
            ),
            "beta_regularizer": regularizers.serialize(self.beta_regularizer),
            "gamma_regularizer": regularizers.serialize(self.gamma_regularizer),
            "beta_constraint": constraints.serialize(self.beta_constraint),
            "gamma_constraint": constraints.serialize(self.gamma_constraint),
            "synchronized": self.synchronized,
        }
        return {**super().get_config(), **config}
