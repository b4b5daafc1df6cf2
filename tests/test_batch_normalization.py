"""The layer against its oracles: the numpy reference and keras.layers.BatchNormalization.

Backend-agnostic: CI also runs this file with KERAS_BACKEND=jax (test_backends.py).
"""

import keras
import numpy as np
import pytest

from keras_bn_ext import BatchNormalization
from keras_bn_ext.reference import batch_norm
from tests.helpers import assert_close, lenet, run_layer_test

RNG = np.random.default_rng(0)

SHAPES = {
    "2d": ((16, 5), -1),
    "3d": ((4, 7, 5), -1),
    "4d_channels_last": ((4, 6, 6, 3), -1),
    "4d_channels_first": ((4, 3, 6, 6), 1),
    "5d_channels_last": ((2, 3, 4, 4, 3), -1),
    "5d_channels_first": ((2, 3, 3, 4, 4), 1),
}


def _data(shape, scale=3.0, offset=2.0):
    return (RNG.normal(size=shape) * scale + offset).astype("float32")


def _randomize(layer, channels):
    """Non-trivial weights: default statistics (0 and 1) would hide mistakes."""
    values = []
    if layer.scale:
        values.append(RNG.uniform(0.5, 2.0, channels))
    if layer.center:
        values.append(RNG.normal(size=channels))
    values += [RNG.normal(size=channels), RNG.uniform(0.2, 3.0, channels)]
    layer.set_weights([v.astype("float32") for v in values])


def _weights(layer):
    w = {v.path.split("/")[-1]: keras.ops.convert_to_numpy(v) for v in layer.weights}
    return w.get("gamma"), w.get("beta"), w["moving_mean"], w["moving_variance"]


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("center,scale", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("training", [True, False])
def test_matches_numpy_reference(name, center, scale, training):
    shape, axis = SHAPES[name]
    x = _data(shape)
    layer = BatchNormalization(axis=axis, center=center, scale=scale)
    layer.build(shape)
    _randomize(layer, shape[axis])
    gamma, beta, mean, var = _weights(layer)

    expected, new_mean, new_var = batch_norm(training, x, gamma, beta, mean, var, 1e-5, 0.9, axis=axis)
    run_layer_test(
        BatchNormalization,
        {"axis": axis, "center": center, "scale": scale},
        x,
        expected_num_trainable_weights=int(center) + int(scale),
        expected_num_non_trainable_weights=2,
    )
    out = layer(x, training=training)
    assert_close(out, expected, what="output")
    assert_close(layer.moving_mean, new_mean, what="moving mean")
    assert_close(layer.moving_variance, new_var, what="moving variance")


def test_reference_keeps_seed_signature_and_nchw_default():
    x = _data((8, 3, 5, 5))
    g, b = np.ones((1, 3, 1, 1)), np.zeros((1, 3, 1, 1))
    m, v = np.zeros((1, 3, 1, 1)), np.ones((1, 3, 1, 1))
    y, m2, v2 = batch_norm(True, x, g, b, m, v, 1e-5, 0.9)
    assert m2.shape == (1, 3, 1, 1) and y.shape == x.shape
    # Per-channel batch statistics of y are 0 and ~1 (variance shrunk by eps).
    assert_close(y.mean(axis=(0, 2, 3)), np.zeros(3), rtol=1e-5)
    layer = BatchNormalization(axis=1)
    assert_close(layer(x, training=True), y, what="layer vs seed default axis")


def test_moving_statistics_after_several_steps():
    shape, axis = (32, 4, 4, 3), -1
    layer = BatchNormalization()
    mean, var = np.zeros(3), np.ones(3)
    for step in range(6):
        x = _data(shape, scale=1.0 + step, offset=-step)
        y = layer(x, training=True)
        expected, mean, var = batch_norm(True, x, None, None, mean, var, 1e-5, 0.9, axis=axis)
        assert_close(y, expected, what=f"step {step}")
    assert_close(layer.moving_mean, mean, what="moving mean")
    assert_close(layer.moving_variance, var, what="moving variance")
    assert_close(layer(x, training=False), batch_norm(False, x, None, None, mean, var, 1e-5, 0.9, axis=axis)[0])


@pytest.mark.parametrize("name", SHAPES)
def test_matches_builtin_layer(name):
    shape, axis = SHAPES[name]
    ours = BatchNormalization(axis=axis)
    theirs = keras.layers.BatchNormalization(axis=axis, momentum=0.9, epsilon=1e-5)
    ours.build(shape)
    theirs.build(shape)
    _randomize(ours, shape[axis])
    theirs.set_weights(ours.get_weights())  # the same order: gamma, beta, mean, variance
    for step in range(3):
        x = _data(shape, offset=step)
        assert_close(ours(x, training=True), theirs(x, training=True), what="training output")
    for a, b in zip(ours.get_weights(), theirs.get_weights()):
        assert_close(a, b, what="weights after updates")
    assert_close(ours(x, training=False), theirs(x, training=False), what="inference output")
    assert [w.path.split("/")[-1] for w in ours.weights] == [
        w.path.split("/")[-1] for w in theirs.weights
    ]


def test_lenet_training_losses_match_builtin():
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 1, (64 * 30, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, 64 * 30)
    histories = []
    for factory in (
        BatchNormalization,
        lambda: keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5),
    ):
        model = lenet(factory)
        model.compile(keras.optimizers.RMSprop(), "sparse_categorical_crossentropy")
        losses = [float(model.train_on_batch(x[i : i + 64], y[i : i + 64])) for i in range(0, len(x), 64)]
        histories.append(losses)
    ours, theirs = np.array(histories)
    # Same maths in the same order: over 30 RMSprop steps the losses were measured
    # identical on TensorFlow and 4.8e-7 apart on JAX (losses ~2.4); 2e-6 absolute
    # leaves room for other kernels and still catches any difference in the maths.
    # On PyTorch, Keras's layer takes the variance as E[x^2] - E[x]^2 (keras's torch
    # moments) where ours centres first: each step agrees to float32 rounding
    # (test_matches_keras_layer), and 30 steps drift apart by 2.2e-5 (measured).
    atol = 1e-4 if keras.backend.backend() == "torch" else 2e-6
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=atol)
    assert ours.min() < ours[0]  # it trains (random labels: the loss only wobbles down)


def test_freeze_means_inference_and_no_update():
    x = _data((16, 4))
    layer = BatchNormalization()
    layer.build(x.shape)
    _randomize(layer, 4)
    before = layer.get_weights()
    layer.trainable = False
    out = layer(x, training=True)
    gamma, beta, mean, var = before
    assert_close(out, batch_norm(False, x, gamma, beta, mean, var, 1e-5, 0.9)[0])
    for a, b in zip(layer.get_weights(), before):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(policy):
    keras.config.set_dtype_policy(policy)
    x = _data((64, 8), scale=200.0, offset=300.0)  # x**2 overflows float16 sums
    layer = BatchNormalization()
    out = layer(x, training=True)
    assert keras.backend.standardize_dtype(out.dtype) == policy.split("_")[1]
    for w in layer.weights:
        assert w.dtype == "float32"
    x_low = keras.ops.convert_to_numpy(keras.ops.cast(x, policy.split("_")[1])).astype("float32")
    expected, mean, var = batch_norm(True, x_low, None, None, np.zeros(8), np.ones(8), 1e-5, 0.9)
    # The output is rounded to float16 (11-bit mantissa, 2**-11 ~ 5e-4) or
    # bfloat16 (8 bits, 2**-8 ~ 4e-3) on values of magnitude ~3.
    assert_close(out, expected, rtol=5e-4 if policy == "mixed_float16" else 4e-3)
    assert np.all(np.isfinite(keras.ops.convert_to_numpy(layer.moving_variance)))
    assert_close(layer.moving_variance, var, rtol=1e-4)


def test_mask_excludes_positions_from_statistics():
    x = _data((4, 6, 3))
    mask = np.ones((4, 6), bool)
    mask[:, 4:] = False
    x[:, 4:] = 1000.0  # would dominate the statistics if it were counted
    layer = BatchNormalization()
    out = layer(x, training=True, mask=mask)
    kept = x[mask]  # (N, 3)
    expected, mean, var = batch_norm(True, kept, None, None, np.zeros(3), np.ones(3), 1e-5, 0.9)
    assert_close(keras.ops.convert_to_numpy(out)[mask], expected)
    assert_close(layer.moving_mean, mean)
    theirs = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)
    # Keras adds 1e-7 to the count: relative difference ~1e-8 on the mean.
    assert_close(out, theirs(x, training=True, mask=mask))


def test_mask_through_a_model_with_embedding():
    inputs = keras.Input((5,), dtype="int32")
    h = keras.layers.Embedding(10, 4, mask_zero=True)(inputs)
    h = BatchNormalization()(h)
    model = keras.Model(inputs, h)
    out = model(np.array([[1, 2, 3, 0, 0]]), training=True)
    assert out.shape == (1, 5, 4)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"epsilon": 0.0}, "Received: epsilon=0.0"),
        ({"epsilon": -1e-3}, "Received: epsilon=-0.001"),
        ({"momentum": 1.0}, "Received: momentum=1.0"),
        ({"decay": -0.1}, "Received: momentum=-0.1"),
        ({"decay": 0.9, "momentum": 0.99}, "Received: decay=0.9, momentum=0.99"),
        ({"axis": [1, 2]}, "Received: axis=[1, 2]"),
    ],
)
def test_bad_arguments(kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        BatchNormalization(**kwargs)


def test_axis_out_of_range():
    with pytest.raises(ValueError, match="Received: axis=3"):
        BatchNormalization(axis=3)(np.zeros((2, 3, 4), "float32"))
    with pytest.raises(ValueError, match="Received: axis=-4"):
        BatchNormalization(axis=-4)(np.zeros((2, 3, 4), "float32"))


def test_mask_rules_are_keras_rules():
    # Keras 3.15: a mask must have rank ndim - 1 (checked always, with Keras's message),
    # is ignored in inference, and is broadcast after expanding its last axis.
    x = np.zeros((4, 6, 3), "float32")
    with pytest.raises(ValueError, match=r"one dimension less than the inputs"):
        BatchNormalization()(x, mask=np.ones((4, 6, 3), bool))
    ours = BatchNormalization()(x, mask=np.ones((4, 5), bool))  # inference: ignored, as Keras
    assert_close(ours, keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)(x, mask=np.ones((4, 5), bool)))


@pytest.mark.parametrize("axis,shape,mask", [
    (1, (4, 3, 3), [[1, 1, 0], [1, 0, 1], [1, 1, 1], [0, 1, 1]]),  # the mask lands on the channel axis
    (-1, (1, 2, 3, 4), [[[1], [0]]]),  # (1, 2, 1) broadcast over (1, 2, 3, 4)
    (-1, (4, 5), [0, 0, 0, 0]),  # a fully masked batch
])
def test_masked_statistics_equal_keras(axis, shape, mask):
    x = np.random.RandomState(1).normal(size=shape).astype("float32")
    mask = np.asarray(mask, bool)
    ours = BatchNormalization(axis=axis, momentum=0.0, epsilon=1e-3)
    theirs = keras.layers.BatchNormalization(axis=axis, momentum=0.0, epsilon=1e-3)
    assert_close(ours(x, training=True, mask=mask), theirs(x, training=True, mask=mask))
    assert_close(ours.moving_mean, theirs.moving_mean, what="moving mean")
    assert_close(ours.moving_variance, theirs.moving_variance, what="moving variance")


def test_seed_names_and_defaults():
    layer = BatchNormalization()
    assert layer.decay == layer.momentum == 0.9 and layer.epsilon == 1e-5
    assert BatchNormalization(momentum=0.99).decay == 0.99
    assert BatchNormalization(decay=0.8, momentum=0.8).momentum == 0.8
    layer.build((2, 3))
    assert layer.running_mean is layer.moving_mean
    assert layer.running_var is layer.moving_variance
    with pytest.raises(AttributeError):
        layer.running_mean = None


def test_regularizers_and_constraints_apply():
    layer = BatchNormalization(
        gamma_regularizer="l2", beta_regularizer=keras.regularizers.L1(0.5),
        gamma_constraint="non_neg", beta_constraint=keras.constraints.MaxNorm(1.0),
    )
    layer.build((2, 3))
    assert len(layer.losses) == 2
    assert layer.gamma.constraint is not None and layer.beta.constraint is not None


def test_kwargs_reach_layer():
    layer = BatchNormalization(name="bn_x", dtype="bfloat16", trainable=False)
    assert layer.name == "bn_x" and layer.compute_dtype == "bfloat16" and not layer.trainable
    out = layer(np.ones((3, 2), "float32"), training=True)
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"


RENORM_STATE = ("moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev")


@pytest.mark.parametrize("clipping", [None, {"rmax": 1.5, "rmin": 0.7, "dmax": 0.5}])
@pytest.mark.parametrize("shape,axis", [((16, 5), -1), ((4, 3, 6, 6), 1)])
def test_renorm_training_steps_match_the_numpy_reference(clipping, shape, axis):
    from keras_bn_ext.reference import batch_renorm

    rng = np.random.default_rng(5)
    layer = BatchNormalization(axis=axis, momentum=0.9, epsilon=1e-3, renorm=True,
                               renorm_clipping=clipping, renorm_momentum=0.8)
    layer.build(shape)
    layer.gamma.assign(rng.uniform(0.5, 1.5, shape[axis]))
    layer.beta.assign(rng.normal(0, 0.3, shape[axis]))
    state = {k: keras.ops.convert_to_numpy(getattr(layer, k)) for k in RENORM_STATE}
    for _ in range(4):  # the state drifts from its initial values step by step
        x = rng.normal(2.0, 3.0, shape).astype("float32")
        expected, state = batch_renorm(
            x, keras.ops.convert_to_numpy(layer.gamma), keras.ops.convert_to_numpy(layer.beta), state,
            axis=axis, eps=1e-3, momentum=0.9, renorm_momentum=0.8, **(clipping or {}))
        assert_close(layer(x, training=True), expected, what="renorm output")
        for key in RENORM_STATE:
            assert_close(getattr(layer, key), state[key], what=key)


def test_renorm_config_round_trip_and_weights_order():
    layer = BatchNormalization(renorm=True, renorm_clipping={"rmax": 3.0}, renorm_momentum=0.95)
    layer.build((None, 4))
    assert [w.name for w in layer.weights] == [
        "gamma", "beta", "moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev"]
    config = layer.get_config()
    assert config["renorm"] and config["renorm_clipping"] == {"rmax": 3.0} and config["renorm_momentum"] == 0.95
    assert BatchNormalization.from_config(config).get_config() == config
