"""The function a converter traces: the Keras model in inference mode, one named input per
model input (Keras's InputLayer names), the outputs as a dict keyed by Keras's output names,
the batch dimension dynamic (or fixed). Shared by the targets whose converters read a
TensorFlow function (LiteRT, OpenVINO)."""

from __future__ import annotations

import keras

from keras_bn_ext.compare import input_specs, output_names

__all__ = ["serving_function"]


def serving_function(model: keras.Model, batch_size: int | None = None):
    """(python function, list of tf.TensorSpec): the model's inference call and its signature."""
    import tensorflow as tf

    specs = input_specs(model)
    names = output_names(model)
    signature = [tf.TensorSpec((batch_size,) + tuple(shape[1:]), dtype, name=name) for name, shape, dtype in specs]

    def serve(*inputs):
        out = model(list(inputs) if len(inputs) > 1 else inputs[0], training=False)
        return dict(zip(names, keras.tree.flatten(out)))

    return serve, signature
