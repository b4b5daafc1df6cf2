"""The BatchNormalization layer."""

from keras_bn_ext.layers.batch_normalization import BatchNormalization

__all__ = ["BatchNormalization"]
