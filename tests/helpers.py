"""The project's own test helpers (after keras-hub's TestCase), not keras.src.testing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# float32 carries ~7 significant digits; a BN output or a dense/conv output
# sums at most a few thousand products, so errors stay below ~1e-5 of the
# largest magnitude involved. Tolerances below are relative to that magnitude.
FP32_RTOL = 1e-5


def assert_close(actual, expected, *, rtol: float = FP32_RTOL, what: str = "") -> None:
    """Assert max|actual - expected| <= rtol * max(1, max|expected|)."""
    actual = np.asarray(keras.ops.convert_to_numpy(actual), dtype=np.float64)
    expected = np.asarray(keras.ops.convert_to_numpy(expected), dtype=np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = max(1.0, float(np.max(np.abs(expected))) if expected.size else 1.0)
    err = float(np.max(np.abs(actual - expected))) if expected.size else 0.0
    assert err <= rtol * scale, f"{what}: max abs err {err:.3g} > {rtol:g} * {scale:.3g}"


def run_layer_test(
    layer_cls,
    init_kwargs: dict,
    input_data: np.ndarray,
    *,
    expected_output=None,
    training: bool = False,
    expected_num_trainable_weights: int | None = None,
    expected_num_non_trainable_weights: int | None = None,
) -> keras.layers.Layer:
    """Build a layer from kwargs, call it eagerly and in a Functional model, and check
    shapes, weight counts, the config round trip and (optionally) the output."""
    layer = layer_cls(**init_kwargs)
    output = layer(input_data, training=training)
    assert tuple(output.shape) == tuple(input_data.shape)
    assert tuple(layer.compute_output_shape(input_data.shape)) == tuple(input_data.shape)
    if expected_num_trainable_weights is not None:
        assert len(layer.trainable_weights) == expected_num_trainable_weights
    if expected_num_non_trainable_weights is not None:
        assert len(layer.non_trainable_weights) == expected_num_non_trainable_weights
    if expected_output is not None:
        assert_close(output, expected_output, what="layer output")

    clone = layer_cls.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()

    inputs = keras.Input(shape=input_data.shape[1:], batch_size=None)
    model = keras.Model(inputs, layer_cls(**init_kwargs)(inputs))
    assert tuple(model.output.shape[1:]) == tuple(input_data.shape[1:])
    return layer


def run_serialization_test(model: keras.Model, path: str, inputs) -> keras.Model:
    """Save `model` as .keras, load it back in this process, compare outputs and configs."""
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert_close(loaded(inputs, training=False), model(inputs, training=False), rtol=0.0,
                 what="reloaded model output")
    # JSON turns tuples into lists: compare configs as they are stored.
    assert json.loads(json.dumps(loaded.get_config())) == json.loads(json.dumps(model.get_config()))
    return loaded


def run_python(code: str, *, env: dict | None = None, timeout: int = 600) -> str:
    """Run `code` in a fresh Python process (same interpreter and backend); return stdout."""
    full_env = dict(os.environ)
    full_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    full_env.update(env or {})
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=REPO,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def lenet(bn_factory, seed=0):
    """The seed notebook's LeNet-BN, built after seeding."""
    from keras_bn_ext.lenet import lenet_bn

    keras.utils.set_random_seed(seed)
    return lenet_bn(bn_factory, input_name="input_layer")


def two_input_dict_model():
    """Two inputs (image, vector), BNs of both classes, dict outputs; BN statistics random."""
    from keras_bn_ext import BatchNormalization
    from keras_bn_ext.testing import randomize_batchnorms

    layers = keras.layers
    image = keras.Input((8, 8, 3), name="image")
    meta = keras.Input((5,), name="meta")
    h = layers.Conv2D(4, 3, name="conv")(image)
    h = layers.ReLU()(BatchNormalization(name="bn1")(h))
    h = layers.GlobalAveragePooling2D()(h)
    m = layers.ReLU()(layers.BatchNormalization(name="bn2")(layers.Dense(4, name="d")(meta)))
    both = layers.Concatenate()([h, m])
    model = keras.Model([image, meta], {"score": layers.Dense(1, name="s")(both),
                                        "class_logits": layers.Dense(3, name="c")(both)})
    randomize_batchnorms(model)
    return model


INT8_FIXTURES = os.path.join(REPO, "tests", "fixtures", "int8")  # trained by tools/make_int8_fixtures.py


def mnist_digits():
    """((x_train, y_train), (x_test, y_test)) of the shipped sample, as the INT8 fixtures take them."""
    with np.load(os.path.join(REPO, "tools", "data", "mnist-10k.npz")) as d:
        return ((d["x_train"][..., None].astype("float32") / 255.0, d["y_train"].astype("int64")),
                (d["x_test"][..., None].astype("float32") / 255.0, d["y_test"].astype("int64")))


def int8_fixture(name: str) -> keras.Model:
    return keras.saving.load_model(os.path.join(INT8_FIXTURES, f"{name}.keras"))


BIN = os.path.dirname(sys.executable)  # where the console scripts are (bn-fold, bn-export-onnx, ...)


def copy_int8_fixture(folder, name: str = "lenet_bn", as_name: str = "lenet.keras"):
    """A trained fixture copied into `folder` (a CLI must never touch the committed file)."""
    import shutil

    path = os.path.join(str(folder), as_name)
    shutil.copyfile(os.path.join(INT8_FIXTURES, f"{name}.keras"), path)
    return path
