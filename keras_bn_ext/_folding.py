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


def _split(layer, weights):
    """(kernels in float64, their dtypes, bias in float64 or None, bias dtype)."""
    weights = [np.asarray(w) for w in weights]
    use_bias = len(weights) > (2 if isinstance(layer, _SEPARABLE) else 1)
    bias = weights[-1] if use_bias else None
    kernels = weights[:-1] if use_bias else weights
    dtypes = [k.dtype for k in kernels]
    bias_dtype = bias.dtype if bias is not None else dtypes[-1]
    return [k.astype(np.float64) for k in kernels], dtypes, (
        bias.astype(np.float64) if bias is not None else None
    ), bias_dtype


def _join(kernels, dtypes, bias, bias_dtype) -> list[np.ndarray]:
    return [k.astype(d) for k, d in zip(kernels, dtypes)] + [bias.astype(bias_dtype)]


def fold_backward(layer, scale: np.ndarray, shift: np.ndarray, weights=None) -> list[np.ndarray]:
    """Weights of `layer` followed by the affine map (scale, shift) on its output channels.

    `weights` defaults to the layer's own (pass earlier folded ones to compose). The
    returned list always carries a bias (the rebuilt layer has use_bias=True).
    """
    kernels, dtypes, bias, bias_dtype = _split(layer, layer.get_weights() if weights is None else weights)
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
    bias = np.zeros_like(scale) if bias is None else bias
    return _join(kernels, dtypes, bias * scale + shift, bias_dtype)


# Layers a BN can be folded into forward (BN -> layer), on their input channels. Exact
# only without padding: a padded border would get 0 where the BN would have given shift.
FORWARD_CONVS = (
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
) + _DEPTHWISE + _SEPARABLE
FORWARD_TARGETS = (keras.layers.Dense,) + FORWARD_CONVS


def fold_forward(layer, scale: np.ndarray, shift: np.ndarray, weights=None) -> list[np.ndarray]:
    """Weights of `layer` preceded by the affine map (scale, shift) on its input features:
    layer(scale * x + shift) == layer'(x).

    For Dense, `scale`/`shift` have one value per input feature (already laid out in a
    Flatten's order by the caller); for convolutions, one per input channel. Convolutions
    must use padding="valid". The returned list always carries a bias.
    """
    kernels, dtypes, bias, bias_dtype = _split(layer, layer.get_weights() if weights is None else weights)
    if isinstance(layer, keras.layers.Dense):
        w = kernels[0]  # (in, out)
        extra = shift @ w
        kernels[0] = w * scale[:, None]
    elif isinstance(layer, _DEPTHWISE):
        w = kernels[0]  # (..., C, M)
        spatial = tuple(range(w.ndim - 2))
        extra = (w.sum(axis=spatial) * shift[:, None]).reshape(-1)
        kernels[0] = w * scale[:, None]
    elif isinstance(layer, _SEPARABLE):
        dw, pw = kernels  # (..., C, M), (1.., C*M, out)
        spatial = tuple(range(dw.ndim - 2))
        u = (dw.sum(axis=spatial) * shift[:, None]).reshape(-1)  # shift after the depthwise
        extra = u @ pw.reshape(pw.shape[-2], pw.shape[-1])
        kernels[0] = dw * scale[:, None]
    elif type(layer) in FORWARD_CONVS:
        w = kernels[0]  # (..., C/groups, out)
        groups = int(getattr(layer, "groups", 1))
        cin_g, out = w.shape[-2], w.shape[-1]
        group_of_out = np.arange(out) // (out // groups)
        s_mat = scale.reshape(groups, cin_g)[group_of_out].T  # (C/groups, out)
        t_mat = shift.reshape(groups, cin_g)[group_of_out].T
        spatial = tuple(range(w.ndim - 2))
        extra = (w.sum(axis=spatial) * t_mat).sum(axis=0)
        kernels[0] = w * s_mat
    else:  # pragma: no cover - guarded by the analysis
        raise TypeError(f"cannot fold forward into {type(layer).__name__}")
    bias = np.zeros_like(extra) if bias is None else bias
    return _join(kernels, dtypes, bias + extra, bias_dtype)
