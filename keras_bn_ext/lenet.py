"""The seed notebook's network: LeNet with batch normalization after each conv/dense layer."""

from __future__ import annotations

from typing import Callable

import keras

from keras_bn_ext.layers.batch_normalization import BatchNormalization

__all__ = ["lenet_bn"]


def lenet_bn(
    bn_factory: Callable[[], keras.layers.Layer] = BatchNormalization,
    *,
    input_name: str = "image",
) -> keras.Sequential:
    """LeNet-BN as in the seed: Conv2D 6@5 → BN → sigmoid → MaxPool 2 → Conv2D 16@5 →
    BN → sigmoid → MaxPool 2 → Flatten → Dense 120 → BN → sigmoid → Dense 84 → BN →
    sigmoid → Dense 10 sigmoid, on 28×28×1 images.

    Args:
        bn_factory: Makes each BN layer, e.g. `keras_bn_ext.BatchNormalization` (the
            default) or `keras.layers.BatchNormalization`.
        input_name: Name of the input layer (and of the ONNX input after export).
    """
    return keras.Sequential(
        [
            keras.Input((28, 28, 1), name=input_name),
            keras.layers.Conv2D(6, kernel_size=5),
            bn_factory(),
            keras.layers.Activation("sigmoid"),
            keras.layers.MaxPooling2D(pool_size=2, strides=2),
            keras.layers.Conv2D(16, kernel_size=5),
            bn_factory(),
            keras.layers.Activation("sigmoid"),
            keras.layers.MaxPooling2D(pool_size=2, strides=2),
            keras.layers.Flatten(),
            keras.layers.Dense(120),
            bn_factory(),
            keras.layers.Activation("sigmoid"),
            keras.layers.Dense(84),
            bn_factory(),
            keras.layers.Activation("sigmoid"),
            keras.layers.Dense(10, activation="sigmoid"),
        ]
    )
