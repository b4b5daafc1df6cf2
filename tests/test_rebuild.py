"""keras_bn_ext.rebuild: a rebuilt layer carries all of its state, and a rebuild that cannot
is caught layer by layer (the oracle: the original layer, on the same inputs)."""

import keras
import numpy as np
import pytest
from keras import layers

from keras_bn_ext import fold_batchnorms
from keras_bn_ext.compare import compare_models, exact_arithmetic_check, keras_outputs, random_inputs
from keras_bn_ext.errors import RebuildMismatchError
from keras_bn_ext.rebuild import RebuildPlan, rebuild, with_dtype
from keras_bn_ext.testing import randomize_batchnorms


def _adapted_normalization_model():
    # Conv -> BN -> an adapted Normalization (its mean/variance live in tensors its call
    # reads, refreshed by load_own_variables, not in its config) -> GAP -> Dense.
    rng = np.random.default_rng(0)
    x = keras.Input((12, 12, 3), name="image")
    h = layers.Conv2D(6, 3)(x)
    h = layers.BatchNormalization()(h)
    norm = layers.Normalization()
    norm.adapt(rng.normal(3.0, 5.0, size=(32, 10, 10, 6)).astype("float32"))
    h = norm(h)
    y = layers.Dense(3)(layers.GlobalAveragePooling2D()(h))
    model = keras.Model(x, y)
    randomize_batchnorms(model)
    return model


def test_adapted_normalization_survives_rebuild_fold_and_float64_twin():
    model = _adapted_normalization_model()
    batch = random_inputs(model, batch_size=2, seed=0)
    copy = rebuild(model, RebuildPlan(), check_inputs=batch)
    assert compare_models(model, copy, atol=0.0, rtol=1e-6).passed
    folded, report = fold_batchnorms(model)  # verifies itself (FoldError otherwise)
    assert report.bn_folded == 1 and report.verification.passed
    assert compare_models(model, folded, rtol=1e-5).max_rel_err <= 1e-5
    twin = with_dtype(model, check_inputs=batch)
    got = keras_outputs(twin, [b.astype("float64") for b in batch])[0]
    # float64 against float32: float32 rounding of a 3-layer net, ~1e-7 of the output.
    np.testing.assert_allclose(got, keras_outputs(model, batch)[0], rtol=0, atol=1e-5 * np.abs(got).max())


def test_lookup_tables_and_boundaries_are_carried():
    ints = keras.Input((5,), dtype="int32", name="ids")
    lookup = layers.IntegerLookup(output_mode="int")
    lookup.adapt(np.array([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]], "int32"))
    h = layers.Embedding(16, 4)(lookup(ints))
    disc = layers.Discretization(num_bins=4)
    disc.adapt(np.random.default_rng(1).normal(size=(64, 1)).astype("float32"))
    h = layers.Flatten()(h)
    y = layers.Dense(2)(layers.Concatenate()([h, keras.ops.cast(disc(h[:, :1]), "float32")]))
    model = keras.Model(ints, y)
    copy = rebuild(model, RebuildPlan(), check_inputs=random_inputs(model, batch_size=4, seed=0))
    assert compare_models(model, copy, atol=0.0, rtol=1e-6).passed


@keras.saving.register_keras_serializable(package="keras_bn_ext_tests")
class Offset(layers.Layer):
    """State that neither its config nor its variables hold: a Python attribute set after
    building (what an adapt() or a careless custom layer does)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.offset = 0.0

    def call(self, x):
        return x + self.offset


def _offset_model():
    x = keras.Input((8, 8, 3), name="image")
    h = layers.BatchNormalization()(layers.Conv2D(4, 3)(x))
    offset = Offset(name="offset")
    y = layers.Dense(2)(layers.Flatten()(offset(h)))
    model = keras.Model(x, y)
    offset.offset = 3.0
    randomize_batchnorms(model)
    return model


def test_state_no_mechanism_carries_is_caught_by_name():
    model = _offset_model()
    batch = random_inputs(model, batch_size=2, seed=0)
    checks = []
    with pytest.raises(RebuildMismatchError, match=r"layer 'offset' \(Offset\)") as info:
        rebuild(model, RebuildPlan(), check_inputs=batch, checks=checks)
    assert info.value.layer == "offset" and info.value.max_rel_err > 0.1
    assert [c.passed for c in checks if c.layer == "conv2d" or c.kind == "Conv2D"] == [True]
    with pytest.raises(RebuildMismatchError):
        fold_batchnorms(model, inline=False)
    # The float64 judgement refuses such a twin rather than trusting it.
    check = exact_arithmetic_check(model, [batch], [keras_outputs(model, batch)], atol=0.0, rtol=0.0)
    assert not check.passed and check.reference_code == "layer_differs" and "offset" in check.reference_detail
