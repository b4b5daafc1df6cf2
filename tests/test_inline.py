"""folding.inline: custom layers whose call() traces symbolically are replaced by their
graph, so the BNs inside them fold; the others stay, each with its reason."""

import keras
import numpy as np
import pytest
from keras import layers

from keras_bn_ext import BatchNormalization, compare_models, fold_batchnorms
from keras_bn_ext.folding.save import fold_to_file
from keras_bn_ext.testing import count_batchnorms, randomize_batchnorms
from tests.helpers import run_python

# Folding reorders float32 arithmetic: ~1e-7 of the outputs' magnitude on nets this small.
RTOL = 1e-5
PKG = "keras_bn_ext_inline_tests"


@keras.saving.register_keras_serializable(package=PKG)
class ResidualBlock(layers.Layer):
    """conv -> BN -> relu -> conv -> BN, added to the input with a raw op."""

    def __init__(self, filters=4, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.conv1 = layers.Conv2D(filters, 3, padding="same", name="conv1")
        self.bn1 = BatchNormalization(name="bn1")
        self.conv2 = layers.Conv2D(filters, 3, padding="same", name="conv2")
        self.bn2 = layers.BatchNormalization(name="bn2")

    def call(self, x, training=None):
        h = keras.ops.relu(self.bn1(self.conv1(x), training=training))
        return x + self.bn2(self.conv2(h), training=training)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


@keras.saving.register_keras_serializable(package=PKG)
class Stage(layers.Layer):
    """Custom layers inside a custom layer."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.first = ResidualBlock(name="first")
        self.second = ResidualBlock(name="second")

    def call(self, x):
        return self.second(self.first(x))


@keras.saving.register_keras_serializable(package=PKG)
class OwnScale(layers.Layer):
    """Computes with a variable of its own through a raw op: not a graph of layers."""

    def build(self, input_shape):
        self.bn = layers.BatchNormalization()
        self.bn.build(input_shape)
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones")

    def call(self, x):
        return self.bn(x) * self.scale


@keras.saving.register_keras_serializable(package=PKG)
class ValueBranch(layers.Layer):
    """Python control flow on a tensor's value: cannot run on a symbolic input (it
    states its output shape, so a Functional model can still hold it)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.bn = layers.BatchNormalization()

    def build(self, input_shape):
        self.bn.build(input_shape)

    def compute_output_shape(self, input_shape):
        return input_shape

    def call(self, x):
        if float(keras.ops.convert_to_numpy(keras.ops.max(x))) > 0:
            return self.bn(x)
        return x


@keras.saving.register_keras_serializable(package=PKG)
class Pyramid(layers.Layer):
    """Called on a dict of tensors, as a feature pyramid is."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.convs = {k: layers.Conv2D(4, 1, name=f"conv_{k}") for k in ("fine", "coarse")}
        self.bns = {k: layers.BatchNormalization(name=f"bn_{k}") for k in ("fine", "coarse")}

    def call(self, levels):
        up = layers.UpSampling2D(2)
        coarse = self.bns["coarse"](self.convs["coarse"](levels["coarse"]))
        return {"fine": self.bns["fine"](self.convs["fine"](levels["fine"])) + up(coarse), "coarse": coarse}


def _model(block):
    inputs = keras.Input((6, 6, 4), name="pixels")
    x = layers.Conv2D(4, 3, padding="same", name="stem")(inputs)
    model = keras.Model(inputs, layers.GlobalAveragePooling2D(name="pool")(block(x)))
    randomize_batchnorms(model)
    return model


def test_a_traceable_custom_layer_is_replaced_by_its_graph_and_its_bns_fold(tmp_path):
    model = _model(ResidualBlock(name="block"))
    folded, report = fold_batchnorms(model)
    assert report.inlined == ["block (ResidualBlock)"]
    assert report.bn_total == count_batchnorms(model) == 2 and report.bn_folded == 2, report.kept
    assert {f.bn for f in report.folded} == {"block/bn1", "block/bn2"}
    assert count_batchnorms(folded) == 0 and folded.output_names == model.output_names
    assert type(folded.get_layer("block")).__name__ == "Functional"
    assert compare_models(model, folded, samples=2, atol=0.0, rtol=RTOL).passed
    # The file holds only Keras's own layers: it loads where the custom class is unknown.
    result = fold_to_file(model, tmp_path / "f.keras")
    assert result.passed and result.inline_fallback is None
    x = np.random.default_rng(0).standard_normal((2, 6, 6, 4)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", keras.ops.convert_to_numpy(model(x)))
    run_python(f"""
        import sys; sys.modules["keras_bn_ext"] = None
        import keras, numpy as np
        m = keras.saving.load_model({str(tmp_path / "f.keras")!r})
        y = np.asarray(m(np.load({str(tmp_path / "x.npy")!r})))
        ref = np.load({str(tmp_path / "y.npy")!r})
        assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max(), np.abs(y - ref).max()
    """)


def test_a_sequential_stays_a_sequential():
    model = keras.Sequential([keras.Input((6, 6, 4)), layers.Conv2D(4, 1, name="stem"), ResidualBlock(name="block")],
                             name="seq")
    randomize_batchnorms(model)
    folded, report = fold_batchnorms(model)
    assert isinstance(folded, keras.Sequential) and folded.name == "seq"
    assert report.bn_folded == 2 and [layer.name for layer in folded.layers] == ["stem", "block"]
    assert compare_models(model, folded, samples=2, atol=0.0, rtol=RTOL).passed


def test_custom_layers_inside_custom_layers_are_replaced_too():
    model = _model(Stage(name="stage"))
    folded, report = fold_batchnorms(model)
    assert report.inlined == ["stage (Stage)", "stage/first (ResidualBlock)", "stage/second (ResidualBlock)"]
    assert report.bn_folded == report.bn_total == 4
    assert compare_models(model, folded, samples=2, atol=0.0, rtol=RTOL).passed


@pytest.mark.parametrize("block,why", [
    (OwnScale(name="own"), "its call() computes with 1 variables of its own through raw operations"),
    (ValueBranch(name="value"), "its call() does not trace symbolically"),
])
def test_a_layer_that_is_not_a_graph_of_layers_stays_with_its_reason(block, why):
    model = _model(block)
    folded, report = fold_batchnorms(model)
    assert report.inlined == [] and report.bn_folded == 0
    (kept,) = report.kept
    assert f"inside custom layer '{block.name}'" in kept.reason and why in kept.reason
    assert compare_models(model, folded, atol=0.0, rtol=RTOL).passed


def test_a_layer_called_on_a_dict_of_tensors_is_replaced():
    inputs = keras.Input((8, 8, 3))
    fine = layers.Conv2D(4, 3, padding="same", name="f")(inputs)
    coarse = layers.MaxPooling2D(2, name="pool")(fine)
    out = Pyramid(name="fpn")({"fine": fine, "coarse": coarse})
    model = keras.Model(inputs, [out["fine"], out["coarse"]])
    randomize_batchnorms(model)
    folded, report = fold_batchnorms(model)
    assert report.inlined == ["fpn (Pyramid)"] and report.bn_folded == report.bn_total == 2
    assert compare_models(model, folded, samples=2, atol=0.0, rtol=RTOL).passed


def test_a_layer_called_twice_stays():
    block = ResidualBlock(name="shared")
    inputs = keras.Input((6, 6, 4))
    model = keras.Model(inputs, block(block(inputs)))
    randomize_batchnorms(model)
    _, report = fold_batchnorms(model)
    assert report.bn_folded == 0 and all("called more than once" in k.reason for k in report.kept)


def test_keep_custom_layers_and_the_fallback_when_the_inlined_fold_fails(tmp_path, monkeypatch):
    model = _model(ResidualBlock(name="block"))
    result = fold_to_file(model, tmp_path / "kept.keras", inline=False)
    assert result.passed and result.fold.bn_folded == 0 and result.fold.inlined == []
    # Fault injection: the file with the layer replaced does not load back; the fold is
    # done again keeping it, and the result says why.
    real_load = keras.saving.load_model
    loads = []

    def failing_first(*args, **kwargs):
        loads.append(args[0])
        if len(loads) == 1:
            raise ValueError("cannot load")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(keras.saving, "load_model", failing_first)
    result = fold_to_file(model, tmp_path / "f.keras")
    assert result.passed and result.fold.bn_folded == 0 and len(loads) == 2
    assert result.inline_fallback == ("with 1 custom layers replaced by their graphs: the folded model was saved "
                                      "but does not load back: ValueError: cannot load")
