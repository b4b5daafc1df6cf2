"""Config round trip, .keras files on disk, loading in a fresh process, weight swap."""

import json

import keras
import numpy as np

from keras_bn_ext import BatchNormalization
from tests.helpers import assert_close, run_python, run_serialization_test


def _trained_model():
    inputs = keras.Input((6, 6, 3))
    h = keras.layers.Conv2D(4, 3)(inputs)
    h = BatchNormalization(gamma_regularizer="l2", beta_constraint="non_neg", name="bn")(h)
    outputs = keras.layers.Flatten()(h)
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(0).normal(size=(8, 6, 6, 3)).astype("float32")
    for _ in range(3):
        model(x, training=True)  # moves the statistics away from 0 and 1
    return model, x


def test_config_round_trip_is_complete():
    layer = BatchNormalization(
        axis=1, momentum=0.8, epsilon=1e-3, center=False, scale=True,
        gamma_initializer="random_normal", moving_variance_initializer="ones",
        gamma_regularizer=keras.regularizers.L2(0.01), gamma_constraint="non_neg",
        synchronized=True, name="my_bn",
    )
    config = layer.get_config()
    for key in (
        "axis", "decay", "momentum", "epsilon", "center", "scale", "beta_initializer",
        "gamma_initializer", "moving_mean_initializer", "moving_variance_initializer",
        "beta_regularizer", "gamma_regularizer", "beta_constraint", "gamma_constraint",
        "synchronized", "name", "dtype", "trainable",
    ):
        assert key in config, key
    clone = BatchNormalization.from_config(json.loads(json.dumps(config)))
    assert clone.get_config() == config
    assert keras.saving.get_registered_name(BatchNormalization) == "keras_bn_ext>BatchNormalization"


def test_keras_file_round_trip(tmp_path):
    model, x = _trained_model()
    loaded = run_serialization_test(model, str(tmp_path / "m.keras"), x)
    assert isinstance(loaded.get_layer("bn"), BatchNormalization)


def test_load_in_fresh_process_without_custom_objects(tmp_path):
    model, x = _trained_model()
    path = tmp_path / "m.keras"
    np.save(tmp_path / "x.npy", x)
    model.save(path)
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    np.save(tmp_path / "expected.npy", expected)
    out = run_python(
        f"""
        import numpy as np, keras
        import keras_bn_ext  # registers the layer; no custom_objects below
        model = keras.saving.load_model({str(path)!r})
        x = np.load({str(tmp_path / "x.npy")!r})
        y = keras.ops.convert_to_numpy(model(x, training=False))
        np.save({str(tmp_path / "got.npy")!r}, y)
        print(type(model.get_layer("bn")).__module__)
        """
    )
    assert "keras_bn_ext" in out
    np.testing.assert_array_equal(np.load(tmp_path / "got.npy"), expected)


def test_weight_swap_with_builtin_layer():
    model, x = _trained_model()
    ours = model.get_layer("bn")
    theirs = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)
    theirs.build((None, 4, 4, 4))
    theirs.set_weights(ours.get_weights())
    h = np.random.default_rng(1).normal(size=(5, 4, 4, 4)).astype("float32")
    assert_close(theirs(h, training=False), ours(h, training=False))
    back = BatchNormalization()
    back.build((None, 4, 4, 4))
    back.set_weights(theirs.get_weights())
    for a, b in zip(back.get_weights(), ours.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_saved_file_names_the_package(tmp_path):
    import zipfile

    model, _ = _trained_model()
    path = tmp_path / "m.keras"
    model.save(path)
    with zipfile.ZipFile(path) as zf:
        config = zf.read("config.json").decode()
    assert '"registered_name": "keras_bn_ext>BatchNormalization"' in config
