"""A trained BatchNormalization in inference is a per-channel affine map; this is it."""

from __future__ import annotations

import keras
import numpy as np

from keras_bn_ext.errors import InvalidBatchNormError
from keras_bn_ext.layers.batch_normalization import BatchNormalization

__all__ = ["BN_CLASSES", "is_batchnorm", "batchnorm_of", "is_batchnorm_call", "bn_axis", "bn_affine"]

BN_CLASSES = (keras.layers.BatchNormalization, BatchNormalization)


def is_batchnorm(layer) -> bool:
    return isinstance(layer, BN_CLASSES)


def batchnorm_of(layer):
    """The BN a graph node computes: the layer itself, or the BN a TimeDistributed wraps
    (per-frame BN: in inference the same affine map on every frame); else None."""
    while isinstance(layer, keras.layers.TimeDistributed):
        layer = layer.layer
    return layer if is_batchnorm(layer) else None


def is_batchnorm_call(layer) -> bool:
    return batchnorm_of(layer) is not None


def bn_axis(layer, rank: int) -> int:
    """The channel axis, non-negative, of a BN node on inputs of `rank` (a wrapped BN
    sees one axis less: its axes are one further right)."""
    if isinstance(layer, keras.layers.TimeDistributed):
        return bn_axis(layer.layer, rank - 1) + 1
    return layer.axis % rank


def _values(variable) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(variable), np.float64)


def bn_affine(bn) -> tuple[np.ndarray, np.ndarray]:
    """Return (scale, shift) with BN(x) = scale * x + shift per channel, in float64.

    Raises InvalidBatchNormError for a negative or non-finite variance, or
    non-finite gamma, beta or mean.
    """
    bn = batchnorm_of(bn)
    mean = _values(bn.moving_mean)
    var = _values(bn.moving_variance)
    gamma = _values(bn.gamma) if bn.scale else np.ones_like(mean)
    beta = _values(bn.beta) if bn.center else np.zeros_like(mean)
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
