"""`keras_bn_ext.BatchNormalization`, written on `keras.ops` alone."""

from __future__ import annotations

import keras
from keras import constraints, initializers, ops, regularizers

from keras_bn_ext.layers._distribute import cross_replica_sum

__all__ = ["BatchNormalization"]

_UNSET = object()


def _clone(initializer):
    """A fresh initializer of the same kind (one instance must not seed two weights)."""
    return initializers.get(initializers.serialize(initializer))


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
        renorm: If True, batch renormalization (Ioffe 2017) in training, as
            Keras's layer does it; inference is plain BN.
        renorm_clipping: Dict with optional keys `rmax`, `rmin`, `dmax` that
            clip renorm's corrections.
        renorm_momentum: Momentum of renorm's own mean and stddev.
        virtual_batch_size: Ghost batch normalization (Hoffer et al. 2017), as
            tf-keras 2.x had it: in training, a batch of N is normalized in
            N / virtual_batch_size sub-batches of `virtual_batch_size` samples,
            each with its own statistics; gamma and beta are shared, and the
            moving statistics are updated once per batch with the mean over
            the sub-batches of their means and variances. As in tf-keras, the
            sub-batches are strided: sub-batch j holds samples j, j + G,
            j + 2G, ... with G = N / virtual_batch_size. It must divide every
            training batch size. Inference is unchanged (folds and exports).
            None (default): ordinary batch statistics.
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
        renorm: bool = False,
        renorm_clipping: dict | None = None,
        renorm_momentum: float = 0.99,
        virtual_batch_size: int | None = None,
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

        self.renorm = bool(renorm)
        if self.renorm:
            renorm_clipping = renorm_clipping or {}
            keys = ["rmax", "rmin", "dmax"]
            if set(renorm_clipping) - set(keys):
                raise ValueError(
                    "Received invalid keys for `renorm_clipping` argument: "
                    f"{renorm_clipping}. Supported values: {keys}."
                )
            rmax, rmin = renorm_clipping.get("rmax"), renorm_clipping.get("rmin")
            dmax = renorm_clipping.get("dmax")
            if rmax is not None and rmin is not None and rmax < rmin:
                raise ValueError(
                    "rmax should be greater than rmin in the `renorm_clipping` "
                    f"argument. Received: rmax={rmax}, rmin={rmin}."
                )
            if dmax is not None and dmax < 0:
                raise ValueError(
                    "dmax should be non-negative in the `renorm_clipping` "
                    f"argument. Received: dmax={dmax}."
                )
        self.renorm_clipping = renorm_clipping
        self.renorm_momentum = float(renorm_momentum)
        if virtual_batch_size is not None and (
            isinstance(virtual_batch_size, bool)
            or not isinstance(virtual_batch_size, int)
            or virtual_batch_size <= 0
        ):
            raise ValueError(
                "`virtual_batch_size` must be a positive integer that divides the "
                "true batch size of the input tensor. "
                f"Received: virtual_batch_size={virtual_batch_size!r}"
            )
        self.virtual_batch_size = virtual_batch_size
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
        if self.virtual_batch_size is not None and channel_axis == 0:
            raise ValueError(
                "When using `virtual_batch_size`, the batch dimension must be 0 and "
                f"thus axis cannot include 0. Received: axis={self.axis}"
            )
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
        if self.renorm:
            # Batch renormalization tracks the moving standard deviation (the
            # paper's statistic) and, for training, its own renorm mean and stddev,
            # in Keras's order after the four weights above.
            def stddev_initializer(shape, dtype=None):
                return ops.sqrt(_clone(self.moving_variance_initializer)(shape, dtype=dtype))

            self.moving_stddev = self.add_weight(
                shape=shape, name="moving_stddev", initializer=stddev_initializer,
                trainable=False, autocast=False,
            )
            self.renorm_mean = self.add_weight(
                shape=shape, name="renorm_mean",
                initializer=_clone(self.moving_mean_initializer),
                trainable=False, autocast=False,
            )
            self.renorm_stddev = self.add_weight(
                shape=shape, name="renorm_stddev", initializer=stddev_initializer,
                trainable=False, autocast=False,
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
        # As Keras 3.15: any mask of rank ndim - 1 is accepted, also in inference,
        # where it is ignored.
        if len(mask.shape) != len(inputs.shape) - 1:
            raise ValueError(
                "The mask provided should be one dimension less "
                "than the inputs. Received: "
                f"mask.shape={mask.shape}, inputs.shape={inputs.shape}"
            )

    def _mask_weights(self, x, mask):
        # As Keras 3.15: the mask is expanded on the *last* axis and broadcast to
        # the inputs, whatever `axis` is. For a (batch, time) mask and axis=1 on
        # (batch, time, features) inputs it therefore weights (batch, time)
        # entries of channel axis 1 rather than masking time steps; questionable,
        # but a drop-in must compute what Keras computes.
        weights = ops.broadcast_to(ops.expand_dims(mask, -1), ops.shape(x))
        return ops.cast(ops.cast(weights, "bool"), x.dtype)

    def batch_moments(self, x):
        """(mean, variance) of `x` per channel over this layer's reduction axes, summed
        across replicas when `synchronized` (what a training call normalizes with).
        Quantization-aware training's fused conv + BN layer reads them (`qat.conv`)."""
        return self._moments(x, None)

    def _moments(self, x, weights):
        axes = self._reduction_axes
        channels = self._broadcast_shape[self.axis % len(self._broadcast_shape)]
        if self.synchronized or weights is not None:
            ones = ops.ones_like(x) if weights is None else weights
            sums = [ops.sum(x * ones, axes), ops.sum(ones, axes)]
            if self.synchronized:
                sums = cross_replica_sum(sums)
            total, count = sums
            if weights is not None:
                # Keras divides by count + epsilon: a fully masked batch has mean 0.
                count = count + keras.backend.epsilon()
            mean = total / count
            centred = (x - ops.reshape(mean, self._broadcast_shape)) * ones
            squares = ops.sum(ops.square(centred), axes)
            if self.synchronized:
                (squares,) = cross_replica_sum([squares])
            return ops.reshape(mean, (channels,)), ops.reshape(squares / count, (channels,))
        if keras.backend.backend() == "torch":
            # PyTorch runs eagerly, one kernel per op: ops.var is one two-pass kernel
            # where centring and squaring by hand are three (training step 1.04-1.07x
            # Keras's layer -> 0.98-1.03x).
            return ops.mean(x, axes), ops.var(x, axes)
        # Compiled backends fuse these: the same ops as Keras's own moments, so the
        # same numbers (LeNet training losses bit-identical on TensorFlow).
        mean = ops.mean(x, axes)
        centred = x - ops.reshape(ops.stop_gradient(mean), self._broadcast_shape)
        return mean, ops.mean(ops.square(centred), axes)

    def _renorm_corrections(self, mean, variance, dtype):
        """Batch renormalization's r and d (Ioffe 2017), clipped as configured."""
        epsilon = ops.cast(self.epsilon, dtype)
        stddev = ops.sqrt(variance + epsilon)
        renorm_mean = ops.cast(self.renorm_mean, dtype)
        # Avoid dividing by zero early in training, as Keras does.
        renorm_stddev = ops.maximum(ops.cast(self.renorm_stddev, dtype), ops.sqrt(epsilon))
        r = stddev / renorm_stddev
        d = (mean - renorm_mean) / renorm_stddev
        clipping = self.renorm_clipping or {}
        if clipping.get("rmin") is not None:
            r = ops.maximum(r, clipping["rmin"])
        if clipping.get("rmax") is not None:
            r = ops.minimum(r, clipping["rmax"])
        if clipping.get("dmax") is not None:
            d = ops.clip(d, -clipping["dmax"], clipping["dmax"])
        return ops.stop_gradient(r), ops.stop_gradient(d), stddev

    def _update_renorm_statistics(self, mean, stddev, dtype):
        m, rm = self.momentum, self.renorm_momentum
        self.renorm_mean.assign(ops.cast(self.renorm_mean, dtype) * rm + mean * (1.0 - rm))
        self.renorm_stddev.assign(ops.cast(self.renorm_stddev, dtype) * rm + stddev * (1.0 - rm))
        self.moving_mean.assign(ops.cast(self.moving_mean, dtype) * m + mean * (1.0 - m))
        moving_stddev = ops.cast(self.moving_stddev, dtype) * m + stddev * (1.0 - m)
        self.moving_stddev.assign(moving_stddev)
        # The variance used in inference follows the stddev (ReLU against rounding).
        self.moving_variance.assign(ops.relu(moving_stddev * moving_stddev - self.epsilon))

    def call(self, inputs, training=None, mask=None):
        if mask is not None:
            self._check_mask(inputs, mask)
        # float16/bfloat16 overflow easily in the statistics: work in float32.
        work_dtype = keras.backend.result_type(inputs.dtype, "float32")
        x = ops.cast(inputs, work_dtype)
        gamma = ops.cast(self.gamma, work_dtype) if self.scale else None
        beta = ops.cast(self.beta, work_dtype) if self.center else None

        if training and self.trainable:
            weights = None if mask is None else self._mask_weights(x, mask)
            if self.virtual_batch_size is not None:
                # Per-ghost statistics normalize; their means update the moving ones.
                x, ghost_mean, ghost_variance, ghost_shape = self._ghost_moments(x, weights)
                mean = ops.mean(ghost_mean, axis=0)
                variance = ops.mean(ghost_variance, axis=0)
            else:
                mean, variance = self._moments(x, weights)
            if self.renorm:
                r, d, stddev = self._renorm_corrections(mean, variance, work_dtype)
                # (x_hat * r + d) * gamma + beta = x_hat * (r * gamma) + (d * gamma + beta)
                beta = d * gamma if gamma is not None else d
                beta = beta + ops.cast(self.beta, work_dtype) if self.center else beta
                gamma = r * gamma if gamma is not None else r
                self._update_renorm_statistics(mean, stddev, work_dtype)
            else:
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

        if training and self.trainable and self.virtual_batch_size is not None:
            outputs = self._normalize(x, ghost_mean, ghost_variance, gamma, beta, ghost_shape)
            outputs = ops.reshape(outputs, ops.shape(inputs))
        else:
            outputs = self._normalize(x, mean, variance, gamma, beta, self._broadcast_shape)
        return ops.cast(outputs, self.compute_dtype)

    def _normalize(self, x, mean, variance, gamma, beta, shape):
        # y = (x - mean) * inv + beta with inv = gamma / sqrt(var + eps),
        # computed as x * inv + (beta - mean * inv): one multiply-add per element.
        # mean and variance are (channels,), or (sub-batches, channels) for ghost BN.
        inv = ops.rsqrt(variance + self.epsilon)
        if gamma is not None:
            inv = inv * gamma
        shift = -mean * inv
        if beta is not None:
            shift = shift + beta
        return x * ops.reshape(inv, shape) + ops.reshape(shift, shape)

    def _ghost_moments(self, x, weights):
        """Reshape a batch of N into (virtual_batch_size, N / virtual_batch_size, ...)
        as tf-keras does (sub-batch j holds samples j, j + G, ...) and return it with
        the mean and biased variance of each sub-batch, shaped (G, channels), and the
        shape that broadcasts those against it."""
        vbs = self.virtual_batch_size
        batch = x.shape[0]
        if batch is not None and batch % vbs:
            raise ValueError(
                "`virtual_batch_size` must divide the batch size of the inputs. "
                f"Received: virtual_batch_size={vbs}, inputs.shape={tuple(x.shape)}"
            )
        shape = ops.shape(x)
        ghost_shape = (vbs, -1) + tuple(shape[1:])
        x = ops.reshape(x, ghost_shape)
        # Reduce over the virtual-batch axis 0 and every non-channel axis, keep axis 1.
        axes = [0] + [a + 1 for a in self._reduction_axes if a != 0]
        if weights is None:
            mean = ops.mean(x, axes, keepdims=True)
            centred = x - ops.stop_gradient(mean)
            variance = ops.mean(ops.square(centred), axes, keepdims=True)
        else:
            weights = ops.reshape(weights, ghost_shape)
            # As Keras's masked moments: a fully masked sub-batch has mean 0.
            count = ops.sum(weights, axes, keepdims=True) + keras.backend.epsilon()
            mean = ops.sum(x * weights, axes, keepdims=True) / count
            centred = (x - mean) * weights
            variance = ops.sum(ops.square(centred), axes, keepdims=True) / count
        rank = len(self._broadcast_shape)
        channels = self._broadcast_shape[self.axis % rank]
        broadcast = [1] * (rank + 1)
        broadcast[1] = -1
        broadcast[self.axis % rank + 1] = channels
        return (x, ops.reshape(mean, (-1, channels)), ops.reshape(variance, (-1, channels)),
                tuple(broadcast))

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
            "renorm": self.renorm,
            "renorm_clipping": self.renorm_clipping,
            "renorm_momentum": self.renorm_momentum,
            "virtual_batch_size": self.virtual_batch_size,
        }
        return {**super().get_config(), **config}
