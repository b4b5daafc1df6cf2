"""Helpers for checking a BN pipeline: give every BatchNormalization non-trivial
statistics, then fold/export and compare.

A freshly built model's BNs hold mean 0, variance 1, gamma 1 and beta 0: an identity
map, so a fold that puts the scale in the wrong place still "passes". Randomize first.
"""

from __future__ import annotations

import keras
import numpy as np

from keras_bn_ext import _keras_internals as internals
from keras_bn_ext.folding.affine import is_batchnorm

__all__ = ["batchnorm_layers", "count_batchnorms", "randomize_batchnorms"]


def batchnorm_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Every BatchNormalization (Keras's or keras_bn_ext's) in `model`, at any depth,
    including BNs held inside custom layers."""
    return [layer for layer in internals.all_sublayers(model) if is_batchnorm(layer)]


def count_batchnorms(model: keras.Model) -> int:
    return len(batchnorm_layers(model))


def randomize_batchnorms(model: keras.Model, seed: int = 0) -> None:
    """Give every built BN of `model` (nested ones too) random gamma in [0.5, 1.5], beta
    and moving mean ~ N(0, 0.2), and moving variance in [0.5, 1.5]. Changes `model`."""
    rng = np.random.default_rng(seed)
    for layer in batchnorm_layers(model):
        if not layer.built:
            continue
        c = layer.moving_mean.shape[0]
        values = []
        if layer.scale:
            values.append(rng.uniform(0.5, 1.5, c))
        if layer.center:
            values.append(rng.normal(0, 0.2, c))
        values += [rng.normal(0, 0.2, c), rng.uniform(0.5, 1.5, c)]
        layer.set_weights([v.astype(w.dtype) for v, w in zip(values, layer.get_weights())])
