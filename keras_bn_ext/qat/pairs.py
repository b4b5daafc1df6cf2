"""Which conv/dense + BatchNormalization pairs a quantization-aware model fuses: the backward
folds of folding's graph analysis (`folding.analysis.analyze`) into a layer class that
`QuantizedConv` wraps, at the model's top level."""

from __future__ import annotations

import keras

from keras_bn_ext.folding.analysis import analyze
from keras_bn_ext.qat.conv import SUPPORTED

__all__ = ["fused_pairs"]


def fused_pairs(model: keras.Model) -> dict[int, keras.layers.Layer]:
    """id(conv/dense layer) -> the BN fused with it."""
    pairs = {}
    for d in analyze(model):
        if d.folded and d.direction == "backward" and not d.slices and "/" not in d.path \
                and type(d.into) in SUPPORTED and not d.keeps_name:
            pairs[id(d.into)] = d.bn
    return pairs
