"""model_io: what makes a written model file load back."""

import keras
import numpy as np
import pytest
from keras import layers

from keras_bn_ext.folding.save import fold_to_file
from keras_bn_ext.model_io import loadable_build_configs
from keras_bn_ext.testing import randomize_batchnorms


@keras.saving.register_keras_serializable(package="keras_bn_ext_tests")
class TupleOnlyBuild(layers.Layer):
    """A layer whose build() only accepts the tuple shape a call gives it, not the list
    a .keras file stores (as keras_hub's SpatialPyramidPooling)."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=input_shape[-1:] + (2,), initializer="ones")

    def call(self, x):
        return keras.ops.matmul(x, self.w)


def _model():
    inputs = keras.Input((6,))
    x = layers.BatchNormalization()(layers.Dense(4)(inputs))
    return keras.Model(inputs, TupleOnlyBuild(name="tuple_only")(x))


def test_a_layer_that_cannot_build_from_its_stored_shape_is_saved_without_it(tmp_path):
    model = _model()
    randomize_batchnorms(model)
    # As Keras would save it, the file does not load.
    model.save(tmp_path / "plain.keras")
    with pytest.raises(Exception, match="can only concatenate list"):
        keras.saving.load_model(tmp_path / "plain.keras")
    result = fold_to_file(model, tmp_path / "f.keras")
    assert result.passed and result.output and result.file_check.max_rel_err == 0.0
    assert result.build_configs_dropped == [(
        "layer 'tuple_only' (TupleOnlyBuild): its build() fails on the JSON form of its input shape; "
        "saved without a build config, so loading builds it by calling it")]
    reloaded = keras.saving.load_model(result.output)
    x = np.random.default_rng(0).standard_normal((3, 6)).astype("float32")
    np.testing.assert_allclose(reloaded(x), model(x), rtol=1e-5, atol=1e-6)
    # The caller's model keeps its build config.
    assert model.get_layer("tuple_only").get_build_config() == {"input_shape": (None, 4)}


@keras.saving.register_keras_serializable(package="keras_bn_ext_tests")
class AnyShapeBuild(TupleOnlyBuild):
    def build(self, input_shape):
        super().build(tuple(input_shape))


def test_layers_that_build_from_their_stored_shape_are_left_alone():
    inputs = keras.Input((6,))
    model = keras.Model(inputs, AnyShapeBuild(name="any")(layers.BatchNormalization()(inputs)))
    assert loadable_build_configs(model) == []
    assert model.get_layer("any").get_build_config() == {"input_shape": (None, 6)}
