"""Ghost batch normalization (`virtual_batch_size`) against its oracles: the numpy
reference (`reference.ghost_batch_norm`, a loop over sub-batches) on every backend, and
tf-keras 2.x's own layer on TensorFlow.

Backend-agnostic: CI also runs this file with KERAS_BACKEND=jax and torch
(test_backends.py), so the JAX and PyTorch layers are held to the same numpy numbers
that the TensorFlow layer and tf-keras agree on.
"""

import importlib.util

import keras
import numpy as np
import pytest

from keras_bn_ext import BatchNormalization
from keras_bn_ext.reference import batch_norm, ghost_batch_norm
from tests.helpers import assert_close

RNG = np.random.default_rng(7)

CASES = {
    "2d": ((16, 5), -1, 4),
    "3d": ((8, 6, 5), -1, 2),
    "4d_channels_last": ((12, 4, 4, 3), -1, 3),
    "4d_channels_first": ((8, 3, 4, 4), 1, 4),
    "one_ghost_batch": ((6, 5), -1, 6),
}


def _data(shape):
    return (RNG.normal(size=shape) * 3.0 + 2.0).astype("float32")


def _randomized(layer, shape, axis):
    layer.build(shape)
    c = shape[axis]
    values = [RNG.uniform(0.5, 2.0, c), RNG.normal(size=c), RNG.normal(size=c), RNG.uniform(0.2, 3.0, c)]
    layer.set_weights([v.astype("float32") for v in values])
    return [keras.ops.convert_to_numpy(w) for w in layer.weights]


@pytest.mark.parametrize("name", CASES)
def test_training_steps_match_numpy_reference(name):
    shape, axis, vbs = CASES[name]
    layer = BatchNormalization(axis=axis, virtual_batch_size=vbs, momentum=0.8)
    gamma, beta, mean, var = _randomized(layer, shape, axis)
    for _ in range(5):  # several steps: the moving statistics carry over
        x = _data(shape)
        expected, mean, var = ghost_batch_norm(x, gamma, beta, mean, var, virtual_batch_size=vbs,
                                               axis=axis, eps=1e-5, momentum=0.8)
        # float32 normalization of O(1) values: errors ~1e-7 of max|y|.
        assert_close(layer(x, training=True), expected, what="output")
        assert_close(layer.moving_mean, mean, what="moving mean")
        assert_close(layer.moving_variance, var, what="moving variance")


def test_sub_batches_are_strided_as_in_tf_keras():
    """Sub-batch j holds samples j, j+G, ...: a batch whose even and odd samples differ
    in scale is normalized per parity class with virtual_batch_size = N / 2."""
    x = _data((8, 3))
    x[1::2] *= 10.0
    y = keras.ops.convert_to_numpy(BatchNormalization(virtual_batch_size=4)(x, training=True))
    for parity in (0, 1):
        rows = x[parity::2]
        z = (rows - rows.mean(0)) / np.sqrt(rows.var(0) + 1e-5)
        assert_close(y[parity::2], z, what=f"sub-batch {parity}")


def test_equals_plain_bn_when_virtual_batch_is_the_batch():
    x = _data((8, 4))
    ghost = BatchNormalization(virtual_batch_size=8)
    plain = BatchNormalization()
    assert_close(ghost(x, training=True), plain(x, training=True), what="output")
    assert_close(ghost.moving_variance, plain.moving_variance, what="moving variance")


def test_inference_is_unchanged():
    shape, axis, vbs = CASES["4d_channels_last"]
    layer = BatchNormalization(axis=axis, virtual_batch_size=vbs)
    gamma, beta, mean, var = _randomized(layer, shape, axis)
    x = _data((5,) + shape[1:])  # any batch size in inference: nothing is split
    expected, _, _ = batch_norm(False, x, gamma, beta, mean, var, 1e-5, 0.9, axis=axis)
    assert_close(layer(x, training=False), expected, what="inference output")


def test_masked_sub_batch_statistics():
    """Masked positions take no part in any sub-batch's statistics (Keras's mask rules:
    the mask is expanded on the last axis)."""
    x = _data((8, 6, 3))
    mask = RNG.uniform(size=(8, 6)) > 0.3
    layer = BatchNormalization(virtual_batch_size=4, momentum=0.0)
    y = keras.ops.convert_to_numpy(layer(x, training=True, mask=mask))
    means, variances = [], []
    for j in range(2):
        rows, m = x[j::2], mask[j::2]
        values = rows[m]  # (kept positions, channels)
        mu, var = values.mean(0), values.var(0)
        means.append(mu)
        variances.append(var)
        assert_close(y[j::2], (rows - mu) / np.sqrt(var + 1e-5), what="masked sub-batch output")
    assert_close(layer.moving_mean, np.mean(means, 0), what="moving mean")
    assert_close(layer.moving_variance, np.mean(variances, 0), what="moving variance")


def test_inside_a_compiled_training_step():
    """model.fit traces the layer with an unknown batch size."""
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(1)(BatchNormalization(virtual_batch_size=8)(inputs))
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="sgd", loss="mse")
    x, y = _data((64, 4)), _data((64, 1))
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert not np.allclose(keras.ops.convert_to_numpy(model.layers[1].moving_mean), 0.0)


@pytest.mark.parametrize("value", [0, -2, 2.5, True, "4"])
def test_bad_virtual_batch_size(value):
    with pytest.raises(ValueError, match=r"virtual_batch_size.*Received: virtual_batch_size="):
        BatchNormalization(virtual_batch_size=value)


def test_axis_zero_is_refused():
    with pytest.raises(ValueError, match="axis cannot include 0. Received: axis=0"):
        BatchNormalization(axis=0, virtual_batch_size=2).build((4, 3))


def test_batch_not_divisible_is_refused():
    layer = BatchNormalization(virtual_batch_size=4)
    with pytest.raises(ValueError, match=r"must divide the batch size.*virtual_batch_size=4"):
        layer(_data((6, 3)), training=True)
    layer(_data((6, 3)), training=False)  # inference splits nothing


def test_config_round_trip_and_file(tmp_path):
    layer = BatchNormalization(virtual_batch_size=4, momentum=0.95)
    config = layer.get_config()
    assert config["virtual_batch_size"] == 4
    assert BatchNormalization.from_config(config).get_config() == config
    inputs = keras.Input((3,))
    model = keras.Model(inputs, layer(inputs))
    path = tmp_path / "ghost.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.layers[1].virtual_batch_size == 4
    assert [w.shape for w in loaded.layers[1].weights] == [(3,)] * 4  # Keras's shapes, not tf-keras's


tf_keras_only = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow" or importlib.util.find_spec("tf_keras") is None,
    reason="tf-keras runs on TensorFlow (the test extra installs it); the numpy tests above "
    "hold the other backends to the same numbers",
)


@tf_keras_only
@pytest.mark.parametrize("shape,axis,vbs", [((16, 6), -1, 4), ((12, 5, 5, 3), -1, 3), ((8, 7, 4), 1, 2)])
@pytest.mark.parametrize("renorm", [False, True])
def test_five_training_steps_match_tf_keras(shape, axis, vbs, renorm):
    """Dense/identity -> BN, five SGD steps on both: outputs, gradients, gamma/beta and
    the moving statistics agree with tf-keras 2.x's layer."""
    import tensorflow as tf
    import tf_keras

    kwargs = dict(axis=axis, momentum=0.9, epsilon=1e-3, virtual_batch_size=vbs)
    if renorm:
        kwargs.update(renorm=True, renorm_clipping={"rmax": 2.0, "rmin": 0.5, "dmax": 1.0},
                      renorm_momentum=0.8)
    theirs = tf_keras.layers.BatchNormalization(**kwargs)
    ours = BatchNormalization(**kwargs)
    theirs.build(shape)
    ours.build(shape)
    c = shape[axis]
    start = [RNG.uniform(0.5, 2.0, c), RNG.normal(size=c), RNG.normal(size=c), RNG.uniform(0.2, 3.0, c)]
    for w, v in zip(theirs.weights[:4], start):
        w.assign(v.reshape(w.shape).astype("float32"))
    ours.set_weights([v.astype("float32") for v in start] + [keras.ops.convert_to_numpy(w).reshape(-1)
                                                              for w in ours.weights[4:]])
    if renorm:  # tf-keras starts its stddevs at sqrt(moving_variance_initializer) = 1 as we do
        for name in ("moving_stddev", "renorm_mean", "renorm_stddev"):
            getattr(ours, name).assign(np.asarray(getattr(theirs, name)).reshape(-1))
    projection = RNG.normal(size=shape).astype("float32")
    for _ in range(5):
        x = tf.constant(_data(shape))
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            y_theirs = theirs(x, training=True)
            y_ours = ours(x, training=True)
            loss_theirs = tf.reduce_sum(y_theirs * projection)
            loss_ours = tf.reduce_sum(y_ours * projection)
        # Same float32 operations in another order: ~1e-7 of max|y|.
        assert_close(y_ours, y_theirs, rtol=1e-6, what="output")
        assert_close(tape.gradient(loss_ours, x), tape.gradient(loss_theirs, x), rtol=1e-5, what="input gradient")
        g_theirs = tape.gradient(loss_theirs, [theirs.gamma, theirs.beta])
        g_ours = tape.gradient(loss_ours, [ours.gamma.value, ours.beta.value])
        for a, b, what in zip(g_ours, g_theirs, ("gamma gradient", "beta gradient")):
            assert_close(a, tf.reshape(b, [-1]), rtol=1e-5, what=what)
        for v_theirs, v_ours, g_t, g_o in zip([theirs.gamma, theirs.beta], [ours.gamma, ours.beta], g_theirs, g_ours):
            v_theirs.assign_sub(0.01 * g_t)
            v_ours.assign(v_ours - 0.01 * g_o)
    for name in ("gamma", "beta", "moving_mean", "moving_variance"):
        # Five accumulated steps, float32: 1e-6 of the largest value.
        assert_close(getattr(ours, name), np.reshape(getattr(theirs, name), -1), rtol=1e-6, what=name)
    x = _data(shape)
    assert_close(ours(x, training=False), theirs(x, training=False), rtol=1e-6, what="inference output")


@tf_keras_only
def test_uneven_batch_fails_in_both():
    import tf_keras

    x = _data((6, 3))
    with pytest.raises(Exception, match="reshape"):
        tf_keras.layers.BatchNormalization(virtual_batch_size=4)(x, training=True)
    with pytest.raises(ValueError, match="must divide the batch size"):
        BatchNormalization(virtual_batch_size=4)(x, training=True)
