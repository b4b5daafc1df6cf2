"""keras_bn_ext.testing: the helpers that give models non-trivial BN statistics."""

import keras
import numpy as np
from keras import layers

from keras_bn_ext import BatchNormalization
from keras_bn_ext.testing import batchnorm_layers, randomize_batchnorms, residual_branch_batchnorms


def _residual_model():
    inputs = keras.Input((8, 8, 4))
    stem = layers.BatchNormalization(name="stem_bn")(layers.Conv2D(4, 3, padding="same")(inputs))
    branch = BatchNormalization(name="close_bn")(layers.Conv2D(4, 3, padding="same")(stem))
    x = layers.Add()([stem, layers.Dropout(0.2)(branch)])  # through a dropout, as EfficientNet
    other = layers.BatchNormalization(name="op_bn")(layers.Conv2D(4, 1)(x))
    x = keras.ops.add(x, other)  # a + on symbolic tensors counts as a sum too
    biased = layers.BatchNormalization(name="const_bn")(layers.Conv2D(4, 1)(x))
    x = biased + 1.0  # a constant added: no residual branch
    inner = keras.Sequential([keras.Input((8, 8, 4)), layers.Conv2D(4, 1), layers.BatchNormalization(name="inner_bn")])
    x = layers.Add()([x, inner(x)])  # inside a nested model
    return keras.Model(inputs, x)


def test_residual_branch_batchnorms_finds_the_bn_closing_each_branch():
    names = [layer.name for layer in residual_branch_batchnorms(_residual_model())]
    # stem_bn enters the first sum directly (as ResNet's projection shortcut BN does);
    # const_bn only meets a constant; inner_bn is a nested model's output, summed outside.
    assert sorted(names) == ["close_bn", "inner_bn", "op_bn", "stem_bn"]


def test_residual_gamma_is_drawn_from_its_own_range():
    model = _residual_model()
    randomize_batchnorms(model, residual_gamma=(0.05, 0.25))
    closing = {layer.name for layer in residual_branch_batchnorms(model)}
    bns = batchnorm_layers(model)  # nested ones too
    assert len(bns) == 5
    for layer in bns:
        gamma = np.asarray(layer.gamma)
        low, high = (0.05, 0.25) if layer.name in closing else (0.5, 1.5)
        assert low <= gamma.min() and gamma.max() <= high, layer.name
