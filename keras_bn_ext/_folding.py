"""Weight folding maths: a BN's affine map, and that map pushed into a layer's weights.

All arithmetic in float64; results are cast back to each variable's dtype.
"""

from __future__ import annotations

import keras
import numpy as np

from keras_bn_ext.batch_normalization import BatchNormalization
from keras_bn_ext.errors import InvalidBatchNormError

BN_CLASSES = (keras.layers.BatchNormalization, BatchNormalization)

# Layers a BN can be folded into, backward (layer -> BN). Exact classes only: a
# subclass may change `call`, and folding into it would be a guess.
_KERNEL_LAST = (
    keras.layers.Dense,
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
)
_KERNEL_TRANSPOSED = (
    keras.layers.Conv1DTranspose,
    keras.layers.Conv2DTranspose,
    keras.layers.Conv3DTranspose,
)
_DEPTHWISE = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
_SEPARABLE = (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)
FOLD_TARGETS = _KERNEL_LAST + _KERNEL_TRANSPOSED + _DEPTHWISE + _SEPARABLE


def is_batchnorm(layer) -> bool:
    return isinstance(layer, BN_CLASSES)


def is_fold_target(layer) -> bool:
    return type(layer) in FOLD_TARGETS


def output_channel_axis(layer, rank: int) -> int:
    """The channel axis (non-negative) of a fold target's output of the given rank."""
    if isinstance(layer, keras.layers.Dense):
        return rank - 1
    data_format = getattr(layer, "data_format", "channels_last")
    return rank - 1 if data_format == "channels_last" else 1


def bn_affine(bn) -> tuple[np.ndarray, np.ndarray]:
    """Return (scale, shift) with BN(x) = scale * x + shift per channel, in float64.

    Raises InvalidBatchNormError for a negative or non-finite variance, or
    non-finite gamma, beta or mean.
    """
    mean = np.asarray(keras.ops.convert_to_numpy(bn.moving_mean), np.float64)
    var = np.asarray(keras.ops.convert_to_numpy(bn.moving_variance), np.float64)
    gamma = (
        np.asarray(keras.ops.convert_to_numpy(bn.gamma), np.float64)
        if bn.scale
        else np.ones_like(mean)
    )
    beta = (
        np.asarray(keras.ops.convert_to_numpy(bn.beta), np.float64)
        if bn.center
        else np.zeros_like(mean)
    )
    if not np.all(np.isfinite(var)) or np.any(var < 0):
        bad = int(np.flatnonzero(~np.isfinite(var) | (var < 0))[0])
        raise InvalidBatchNormError(
            f"BatchNormalization '{bn.name}' has a negative or non-finite moving "
            f"variance (channel {bad}: {var[bad]!r}); the model is broken, refusing to "
            "fold it"
        )
    for label, values in (("gamma", gamma), ("beta", beta), ("moving mean", mean)):
        if not np.all(np.isfinite(values)):
            raise InvalidBatchNormError(
                f"BatchNormalization '{bn.name}' has a non-finite {label}; refusing to fold it"
            )
    scale = gamma / np.sqrt(var + float(bn.epsilon))
    return scale, beta - mean * scale


def fold_backward(layer, scale: np.ndarray, shift: np.ndarray) -> list[np.ndarray]:
    """Weights of `layer` followed by the affine map (scale, shift) on its output channels.

    The returned list always carries a bias (the rebuilt layer has use_bias=True).
    """
    weights = [np.asarray(w) for w in layer.get_weights()]
    use_bias = bool(layer.use_bias)
    bias = weights[-1] if use_bias else None
    kernels = weights[:-1] if use_bias else weights
    dtypes = [w.dtype for w in kernels]
    kernels = [k.astype(np.float64) for k in kernels]

    if isinstance(layer, _KERNEL_LAST):
        kernels[0] = kernels[0] * scale  # (..., out)
    elif isinstance(layer, _KERNEL_TRANSPOSED):
        kernels[0] = kernels[0] * scale[:, None]  # (..., out, in)
    elif isinstance(layer, _DEPTHWISE):
        # depthwise kernel (..., C, M); output channel c*M + m.
        c, m = kernels[0].shape[-2:]
        kernels[0] = kernels[0] * scale.reshape(c, m)
    elif isinstance(layer, _SEPARABLE):
        kernels[1] = kernels[1] * scale  # pointwise kernel (..., C*M, out)
    else:  # pragma: no cover - guarded by is_fold_target
        raise TypeError(f"cannot fold into {type(layer).__name__}")

    bias_dtype = bias.dtype if bias is not None else dtypes[-1]
    old_bias = bias.astype(np.float64) if bias is not None else np.zeros_like(scale)
    new_bias = old_bias * scale + shift
    out = [k.astype(d) for k, d in zip(kernels, dtypes)]
    out.append(new_bias.astype(bias_dtype))
    return out
