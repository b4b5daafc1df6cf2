"""fold_batchnorms on synthetic models: every pattern, every keep condition, the rebuild."""

import keras
import numpy as np
import pytest
from keras import layers

from keras_bn_ext import BatchNormalization, compare_models, fold_batchnorms
from keras_bn_ext.errors import InvalidBatchNormError, UnsupportedModelError
from keras_bn_ext.testing import count_batchnorms, randomize_batchnorms
from tests.helpers import assert_close, run_python

# Folding reorders float32 arithmetic: a few ulp per layer (~1e-7 relative).
RTOL = 1e-5


def _check_folded(model, folded, report, *, expect_folded, samples=2):
    assert report.bn_folded == expect_folded, report
    assert count_batchnorms(folded) == count_batchnorms(model) - expect_folded
    cmp = compare_models(model, folded, samples=samples, atol=0.0, rtol=RTOL)
    assert cmp.passed, cmp
    return cmp


def _one(producer, input_shape, bn=None, after=None):
    inputs = keras.Input(input_shape)
    h = producer(inputs)
    h = (bn or BatchNormalization())(h)
    outputs = (after or layers.Activation("relu"))(h)
    model = keras.Model(inputs, outputs)
    randomize_batchnorms(model)
    return model


PATTERNS = {
    "conv1d": (lambda: layers.Conv1D(6, 3), (12, 4), -1),
    "conv2d": (lambda: layers.Conv2D(6, 3, padding="same"), (8, 8, 4), -1),
    "conv3d": (lambda: layers.Conv3D(4, 2), (5, 5, 5, 2), -1),
    "conv2d_groups": (lambda: layers.Conv2D(8, 3, groups=2), (8, 8, 4), -1),
    "conv2d_no_bias": (lambda: layers.Conv2D(6, 3, use_bias=False), (8, 8, 3), -1),
    "conv2d_strided_dilated": (lambda: layers.Conv2D(5, 3, dilation_rate=2), (11, 11, 3), -1),
    "depthwise1d": (lambda: layers.DepthwiseConv1D(3), (10, 4), -1),
    "depthwise2d_m1": (lambda: layers.DepthwiseConv2D(3), (8, 8, 4), -1),
    "depthwise2d_m3": (lambda: layers.DepthwiseConv2D(3, depth_multiplier=3, use_bias=False), (8, 8, 4), -1),
    "separable1d": (lambda: layers.SeparableConv1D(6, 3, depth_multiplier=2), (10, 4), -1),
    "separable2d": (lambda: layers.SeparableConv2D(6, 3, depth_multiplier=2), (8, 8, 3), -1),
    "conv1d_transpose": (lambda: layers.Conv1DTranspose(5, 3, strides=2), (7, 3), -1),
    "conv2d_transpose": (lambda: layers.Conv2DTranspose(5, 3, strides=2, use_bias=False), (5, 5, 3), -1),
    "conv3d_transpose": (lambda: layers.Conv3DTranspose(3, 2), (4, 4, 4, 2), -1),
    "dense": (lambda: layers.Dense(7), (5,), -1),
    "dense_rank3": (lambda: layers.Dense(7, use_bias=False), (4, 5), -1),
    "dense_rank4": (lambda: layers.Dense(3), (3, 4, 5), -1),
    "einsum_dense": (lambda: layers.EinsumDense("ab,bc->ac", output_shape=7, bias_axes="c"), (5,), -1),
    "einsum_dense_rank3_no_bias": (lambda: layers.EinsumDense("abc,cd->abd", output_shape=(4, 6)), (4, 5), -1),
    "einsum_dense_kernel_first": (lambda: layers.EinsumDense("abc,dc->abd", output_shape=(4, 6)), (4, 5), -1),
}

# Spatial sizes differ from the channel count on purpose: keras.ops.add on TensorFlow
# (Keras 3.15) takes a (1, C, 1, 1) bias for NHWC when the last dim equals C, so a
# channels_first conv whose output width equals its filter count adds its bias on the
# wrong axis. That Keras bug is not ours to fold around; bn-fold's verification catches it.
CHANNELS_FIRST = {
    "conv2d_cf": (lambda: layers.Conv2D(6, 3, data_format="channels_first"), (4, 9, 9), 1),
    "conv1d_cf": (lambda: layers.Conv1D(6, 3, data_format="channels_first"), (4, 9), 1),
    "depthwise2d_cf": (lambda: layers.DepthwiseConv2D(3, depth_multiplier=2, data_format="channels_first"), (3, 9, 9), 1),
    "conv2d_transpose_cf": (lambda: layers.Conv2DTranspose(4, 3, data_format="channels_first"), (3, 6, 6), 1),
}


@pytest.mark.parametrize("name", PATTERNS)
@pytest.mark.parametrize("bn_class", ["keras_bn_ext", "keras"])
def test_backward_patterns(name, bn_class):
    make, shape, axis = PATTERNS[name]
    bn = BatchNormalization(axis=axis) if bn_class == "keras_bn_ext" else layers.BatchNormalization(axis=axis)
    model = _one(make(), shape, bn=bn)
    before = [w.copy() for w in model.get_weights()]
    folded, report = fold_batchnorms(model)
    _check_folded(model, folded, report, expect_folded=1)
    assert report.folded[0].direction == "backward"
    assert report.folded[0].into == model.layers[1].name
    target = folded.get_layer(model.layers[1].name)
    assert target.bias is not None  # a folded layer always gets a bias (EinsumDense: bias_axes)
    for a, b in zip(model.get_weights(), before):  # the input model is untouched
        np.testing.assert_array_equal(a, b)


@pytest.mark.nchw_conv
@pytest.mark.parametrize("name", CHANNELS_FIRST)
def test_channels_first(name):
    make, shape, axis = CHANNELS_FIRST[name]
    model = _one(make(), shape, bn=BatchNormalization(axis=axis))
    folded, report = fold_batchnorms(model)
    _check_folded(model, folded, report, expect_folded=1)


@pytest.mark.parametrize(
    "center,scale,epsilon", [(False, True, 1e-3), (True, False, 1e-5), (False, False, 0.1)]
)
def test_bn_options(center, scale, epsilon):
    for bn in (
        BatchNormalization(center=center, scale=scale, epsilon=epsilon),
        layers.BatchNormalization(center=center, scale=scale, epsilon=epsilon),
    ):
        model = _one(layers.Conv2D(4, 3), (6, 6, 3), bn=bn)
        folded, report = fold_batchnorms(model)
        _check_folded(model, folded, report, expect_folded=1)


def _kept_reason(model):
    folded, report = fold_batchnorms(model)
    assert report.bn_folded == 0, report
    assert len(report.kept) >= 1
    cmp = compare_models(model, folded, samples=1, atol=0.0, rtol=RTOL)
    assert cmp.passed
    return report.kept[0].reason


def test_keep_when_producer_has_activation():
    model = _one(layers.Conv2D(4, 3, activation="relu"), (6, 6, 3))
    assert "activation 'relu'" in _kept_reason(model)


def test_keep_when_producer_output_feeds_another_layer():
    inputs = keras.Input((6, 6, 3))
    h = layers.Conv2D(4, 3)(inputs)
    a = layers.Activation("relu")(BatchNormalization()(h))
    out = layers.Add()([a, layers.Activation("tanh")(h)])
    assert "also feeds other layers" in _kept_reason(keras.Model(inputs, out))


def test_keep_when_producer_output_is_model_output():
    inputs = keras.Input((6, 6, 3))
    h = layers.Conv2D(4, 3)(inputs)
    out = layers.Activation("relu")(BatchNormalization()(h))
    assert "is also a model output" in _kept_reason(keras.Model(inputs, [out, h]))


def test_keep_when_producer_is_shared():
    conv = layers.Conv2D(3, 3, padding="same")
    inputs = keras.Input((6, 6, 3))
    h = conv(conv(inputs))
    out = layers.Activation("relu")(BatchNormalization()(h))
    assert "is shared" in _kept_reason(keras.Model(inputs, out))


def test_keep_when_bn_is_shared():
    bn = BatchNormalization()
    inputs = keras.Input((6, 6, 3))
    a = bn(layers.Conv2D(3, 3)(inputs))
    b = bn(layers.Conv2D(3, 3)(inputs))
    out = layers.Add()([a, b])
    assert "BN layer is shared" in _kept_reason(keras.Model(inputs, out))


def test_keep_when_bn_axis_is_not_channel_axis():
    model = _one(layers.Conv2D(4, 3), (6, 6, 3), bn=BatchNormalization(axis=1))
    assert "not the channel axis" in _kept_reason(model)


def test_keep_when_bn_forced_into_training():
    inputs = keras.Input((5,))
    h = BatchNormalization()(layers.Dense(4)(inputs), training=True)
    model = keras.Model(inputs, layers.Activation("relu")(h))
    folded, report = fold_batchnorms(model)
    assert report.bn_folded == 0 and "training=True" in report.kept[0].reason


def test_keep_when_input_is_not_conv_or_dense():
    inputs = keras.Input((6, 6, 3))
    h = layers.Add()([layers.Conv2D(3, 3)(inputs), layers.Conv2D(3, 3)(inputs)])
    out = layers.Activation("relu")(BatchNormalization()(h))
    assert "not a conv/dense layer" in _kept_reason(keras.Model(inputs, out))


def test_bn_that_is_a_model_output_folds_and_the_output_keeps_its_name(tmp_path):
    inputs = keras.Input((5,))
    out = BatchNormalization(name="h")(layers.Dense(4)(inputs))
    model = keras.Model(inputs, [out, layers.ReLU(name="r")(out)])
    randomize_batchnorms(model)
    folded, report = fold_batchnorms(model)
    _check_folded(model, folded, report, expect_folded=1)
    assert folded.output_names == model.output_names == ["h", "r"]
    folded.save(tmp_path / "f.keras")
    assert keras.saving.load_model(tmp_path / "f.keras").output_names == ["h", "r"]
    dict_model = keras.Model(inputs, {"h": out})
    folded, report = fold_batchnorms(dict_model)
    _check_folded(dict_model, folded, report, expect_folded=1)
    assert set(folded(np.zeros((1, 5)), training=False)) == {"h"}


def test_exclude_keeps_named_bn():
    model = _one(layers.Dense(4), (5,), bn=BatchNormalization(name="keep_me"))
    folded, report = fold_batchnorms(model, exclude=["keep_me"])
    assert report.bn_folded == 0 and report.kept[0].reason == "excluded by the caller"
    assert report.kept[0].code == "excluded"


def test_exclude_with_an_unknown_name_is_refused_naming_the_bns():
    # A typo ("bn_3" where the layer is "batch_normalization_3") used to fold every BN and
    # report nothing kept, with no warning.
    from keras_bn_ext.errors import UnknownLayerError

    model = _one(layers.Dense(4), (5,), bn=BatchNormalization(name="bn"))
    with pytest.raises(UnknownLayerError, match="'bn_3'.*its BatchNormalization layers: bn") as info:
        fold_batchnorms(model, exclude=["bn", "bn_3"])
    assert info.value.layer == "bn_3" and info.value.known == ["bn"] and info.value.code == "unknown_layer"


def test_sequential_stays_sequential_and_keeps_names():
    model = keras.Sequential(
        [keras.Input((8, 8, 1)), layers.Conv2D(4, 3, name="c1"), BatchNormalization(name="b1"),
         layers.ReLU(name="r1"), layers.Flatten(name="f"), layers.Dense(3, name="d"),
         layers.BatchNormalization(name="b2"), layers.Softmax(name="s")], name="seq")
    randomize_batchnorms(model)
    folded, report = fold_batchnorms(model)
    _check_folded(model, folded, report, expect_folded=2)
    assert isinstance(folded, keras.Sequential) and folded.name == "seq"
    assert [l.name for l in folded.layers] == ["c1", "r1", "f", "d", "s"]


def test_functional_branches_multiple_inputs_and_dict_outputs():
    a_in = keras.Input((8, 8, 3), name="image")
    b_in = keras.Input((4,), name="meta")
    x = layers.Conv2D(4, 3, name="conv_a")(a_in)
    x = layers.Activation("relu")(BatchNormalization(name="bn_a")(x))
    y = layers.SeparableConv2D(4, 3, padding="same", name="sep")(a_in)
    y = layers.Activation("relu")(layers.BatchNormalization(name="bn_b")(y))
    y = layers.Cropping2D(1)(y)
    merged = layers.GlobalAveragePooling2D()(layers.Add()([x, y]))
    m = layers.Dense(4, name="meta_dense")(b_in)
    m = layers.Activation("tanh")(BatchNormalization(name="bn_m")(m))
    both = layers.Concatenate()([merged, m])
    logits = layers.Dense(3, name="head")(both)
    bn_out = BatchNormalization(name="bn_out")(layers.Dense(2, name="aux")(both))
    model = keras.Model([a_in, b_in], {"logits": logits, "aux": bn_out})
    randomize_batchnorms(model)
    folded, report = fold_batchnorms(model)
    _check_folded(model, folded, report, expect_folded=4)
    assert [t.name for t in folded.inputs] == [t.name for t in model.inputs] or \
        [t._keras_history.operation.name for t in folded.inputs] == ["image", "meta"]
    out = folded([np.zeros((2, 8, 8, 3)), np.zeros((2, 4))], training=False)
    assert set(out) == {"logits", "aux"}
    names = {l.name for l in model.layers} - {"bn_a", "bn_b", "bn_m", "bn_out"}
    assert {l.name for l in folded.layers} == names
    # Every layer that was not a fold target keeps its weights bit for bit.
    targets = {f.into for f in report.folded}
    for layer in model.layers:
        if layer.name in names and layer.name not in targets:
            for a, b in zip(layer.get_weights(), folded.get_layer(layer.name).get_weights()):
                np.testing.assert_array_equal(a, b)


def test_nested_models():
    inner = keras.Sequential(
        [keras.Input((6, 6, 4)), layers.Conv2D(4, 3, padding="same", name="inner_conv"),
         BatchNormalization(name="inner_bn"), layers.ReLU()], name="inner")
    block_in = keras.Input((6, 6, 4))
    block = keras.Model(block_in, layers.ReLU()(layers.BatchNormalization(name="block_bn")(
        layers.DepthwiseConv2D(3, padding="same", name="block_dw")(block_in))), name="block")
    inputs = keras.Input((6, 6, 3))
    h = layers.Conv2D(4, 1, name="stem")(inputs)
    h = BatchNormalization(name="stem_bn")(h)
    h = block(inner(h))
    model = keras.Model(inputs, layers.GlobalAveragePooling2D()(h))
    randomize_batchnorms(model)
    folded, report = fold_batchnorms(model)
    _check_folded(model, folded, report, expect_folded=3)
    assert {f.bn for f in report.folded} == {"stem_bn", "inner/inner_bn", "block/block_bn"}
    assert isinstance(folded.get_layer("inner"), keras.Sequential)


def test_shared_nested_model_stays_shared():
    inner_in = keras.Input((5,))
    inner = keras.Model(inner_in, layers.ReLU()(BatchNormalization()(layers.Dense(5)(inner_in))), name="inner")
    inputs = keras.Input((5,))
    model = keras.Model(inputs, inner(inner(inputs)))
    randomize_batchnorms(model)
    folded, report = fold_batchnorms(model)
    _check_folded(model, folded, report, expect_folded=1)
    assert sum(1 for l in folded.layers if l.name == "inner") == 1


def test_subclassed_model_is_refused():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv = layers.Conv2D(3, 3)
            self.bn = BatchNormalization()

        def call(self, x):
            return self.bn(self.conv(x))

    net = Net()
    net(np.zeros((1, 6, 6, 3)))
    with pytest.raises(UnsupportedModelError, match="subclassed"):
        fold_batchnorms(net)


@pytest.mark.parametrize("bad", [-1.0, np.nan, np.inf])
def test_invalid_variance_is_refused(bad):
    model = _one(layers.Dense(3), (4,))
    bn = model.layers[2]
    w = bn.get_weights()
    w[3][1] = bad
    bn.set_weights(w)
    with pytest.raises(InvalidBatchNormError, match="negative or non-finite"):
        fold_batchnorms(model)


def test_folded_model_loads_without_keras_bn_ext(tmp_path):
    model = _one(layers.Conv2D(4, 3), (6, 6, 3))
    folded, _ = fold_batchnorms(model)
    path = tmp_path / "folded.keras"
    folded.save(path)
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "want.npy", keras.ops.convert_to_numpy(folded(x, training=False)))
    out = run_python(f"""
        import sys, numpy as np, keras
        m = keras.saving.load_model({str(path)!r})
        got = keras.ops.convert_to_numpy(m(np.load({str(tmp_path / 'x.npy')!r}), training=False))
        np.testing.assert_array_equal(got, np.load({str(tmp_path / 'want.npy')!r}))
        print("keras_bn_ext" in sys.modules)
    """)
    assert out.strip() == "False"


def test_added_bias_survives_a_reload(tmp_path):
    model = _one(layers.Conv2D(4, 3, use_bias=False, name="c"), (6, 6, 3))
    folded, _ = fold_batchnorms(model)
    folded.save(tmp_path / "f.keras")
    loaded = keras.saving.load_model(tmp_path / "f.keras")
    assert loaded.get_layer("c").use_bias
    cmp = compare_models(model, loaded, samples=1, atol=0.0, rtol=RTOL)
    assert cmp.passed, cmp


# --- forward folding: BN -> layer, into the layer's input side -----------------------

def _forward(shape, *middle_and_target, bn=None):
    inputs = keras.Input(shape)
    h = (bn or BatchNormalization())(inputs)  # a BN on the input: nothing to fold backward into
    for layer in middle_and_target:
        h = layer(h)
    model = keras.Model(inputs, layers.Activation("tanh")(h))
    randomize_batchnorms(model)
    return model


FORWARD = {
    "dense": lambda: _forward((6,), layers.Dense(4)),
    "dense_rank3_no_bias": lambda: _forward((3, 6), layers.Dense(4, use_bias=False)),
    "dropout_flatten_dense": lambda: _forward((4, 4, 3), layers.Dropout(0.5), layers.Flatten(), layers.Dense(5)),
    "flatten_dense_nchw": lambda: _forward((3, 4, 5), layers.Flatten(), layers.Dense(5), bn=BatchNormalization(axis=1)),
    "flatten_cf_dense": lambda: _forward((3, 4, 5), layers.Flatten(data_format="channels_first"), layers.Dense(5),
                                         bn=layers.BatchNormalization(axis=1)),
    "conv2d_valid": lambda: _forward((7, 7, 3), layers.Conv2D(4, 3, strides=2, dilation_rate=1)),
    "conv2d_groups": lambda: _forward((7, 7, 4), layers.Conv2D(6, 3, groups=2, use_bias=False)),
    "conv1d_dilated": lambda: _forward((12, 3), layers.Conv1D(4, 3, dilation_rate=2)),
    "conv3d": lambda: _forward((5, 5, 5, 2), layers.Conv3D(3, 2)),
    "conv2d_channels_first": lambda: _forward((3, 9, 9), layers.Conv2D(5, 3, data_format="channels_first"),
                                              bn=BatchNormalization(axis=1)),
    "depthwise2d": lambda: _forward((7, 7, 3), layers.DepthwiseConv2D(3, depth_multiplier=2)),
    "separable2d": lambda: _forward((7, 7, 3), layers.SeparableConv2D(4, 3, depth_multiplier=2)),
    "separable1d": lambda: _forward((9, 3), layers.SeparableConv1D(4, 3, use_bias=False)),
    "einsum_dense": lambda: _forward((3, 6), layers.EinsumDense("abc,cd->abd", output_shape=(3, 4), bias_axes="d")),
}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.nchw_conv) if "channels_first" in n else n for n in FORWARD]
)
def test_forward_patterns(name):
    model = FORWARD[name]()
    folded, report = fold_batchnorms(model)
    _check_folded(model, folded, report, expect_folded=1)
    assert report.folded[0].direction == "forward"


@pytest.mark.parametrize("make,needle", [
    (lambda: _forward((7, 7, 3), layers.Conv2D(4, 3, padding="same")), "pads its input"),
    (lambda: _forward((7, 7, 3), layers.Flatten(), layers.Dense(2), bn=BatchNormalization(axis=1)), None),
    (lambda: _forward((7, 3), layers.Dense(2), bn=BatchNormalization(axis=1)), "not the last axis"),
    (lambda: _forward((7, 7, 3), layers.ReLU(), layers.Conv2D(4, 3)), "not a dense/conv layer"),
    (lambda: _forward((7, 7, 3), layers.Conv2DTranspose(4, 3)), "not a dense/conv layer"),
    (lambda: _forward((3, 6), layers.EinsumDense("abc,dc->abd", output_shape=(3, 4))), "2-D kernel"),
])
def test_forward_keep_conditions(make, needle):
    model = make()
    folded, report = fold_batchnorms(model)
    if needle is None:  # BN on a non-channel axis before a Flatten is still exact per feature
        _check_folded(model, folded, report, expect_folded=1)
        return
    assert report.bn_folded == 0 and needle in report.kept[0].reason, report
    assert "no exact forward fold" in report.kept[0].reason


def test_forward_keeps_bn_whose_output_feeds_two_layers():
    inputs = keras.Input((6,))
    h = BatchNormalization()(inputs)
    model = keras.Model(inputs, layers.Add()([layers.Dense(3)(h), layers.Dense(3)(h)]))
    randomize_batchnorms(model)
    _, report = fold_batchnorms(model)
    assert report.bn_folded == 0 and "feeds 2 layers" in report.kept[0].reason


def test_one_layer_takes_a_bn_on_each_side():
    inputs = keras.Input((6,))
    h = BatchNormalization(name="before")(inputs)
    h = layers.Dense(5, name="d")(h)
    h = BatchNormalization(name="after")(h)
    model = keras.Model(inputs, layers.ReLU()(h))
    randomize_batchnorms(model)
    folded, report = fold_batchnorms(model)
    _check_folded(model, folded, report, expect_folded=2)
    assert {(f.bn, f.into, f.direction) for f in report.folded} == {
        ("before", "d", "forward"), ("after", "d", "backward")}


def test_einsum_dense_with_bias_on_another_axis_is_kept():
    model = _one(layers.EinsumDense("abc,cd->abd", output_shape=(4, 6), bias_axes="bd"), (4, 5))
    _, report = fold_batchnorms(model)
    assert report.bn_folded == 0 and "bias_axes 'bd'" in report.kept[0].reason, report


def test_folded_einsum_dense_reloads_with_its_new_bias(tmp_path):
    model = _one(layers.EinsumDense("abc,cd->abd", output_shape=(4, 6), name="e"), (4, 5))
    folded, report = fold_batchnorms(model)
    assert report.bn_folded == 1 and folded.get_layer("e").bias_axes == "d"
    folded.save(tmp_path / "f.keras")
    reloaded = keras.saving.load_model(tmp_path / "f.keras")
    assert compare_models(model, reloaded, atol=0.0, rtol=RTOL).passed


def _ops_model():
    """Keras operations that are not layers, called on symbolic tensors, around BNs."""
    ops = keras.ops
    inputs = keras.Input((8, 8, 3), name="pixels")
    x = ops.pad(inputs, [[0, 0], [1, 1], [1, 1], [0, 0]], constant_values=0.5)
    x = BatchNormalization(name="bn_conv")(layers.Conv2D(6, 3, name="conv")(x))
    x = x * ops.clip(x + 3.0, 0.0, 6.0) / 6.0  # hard-swish, as MobileNetV3 writes it
    left, right = ops.split(x, 2, axis=-1)  # a multi-output op
    y = ops.concatenate([right, left * 2.0], axis=-1)
    y = ops.reshape(y, (-1, 8 * 8 * 6))
    y = layers.BatchNormalization(name="bn_dense")(layers.Dense(5, name="dense")(y))
    model = keras.Model(inputs, {"logits": y - 1.0, "mean": ops.mean(x, axis=(1, 2))})
    randomize_batchnorms(model)
    return model


def test_operations_that_are_not_layers_are_carried_over(tmp_path):
    model = _ops_model()
    folded, report = fold_batchnorms(model)
    _check_folded(model, folded, report, expect_folded=2)
    ops_before = sorted(type(op).__name__ for op in model.operations if not isinstance(op, layers.Layer))
    ops_after = sorted(type(op).__name__ for op in folded.operations if not isinstance(op, layers.Layer))
    assert ops_before == ops_after and "Split" in ops_after and "Pad" in ops_after
    folded.save(tmp_path / "f.keras")
    assert compare_models(model, keras.saving.load_model(tmp_path / "f.keras"), atol=0.0, rtol=RTOL).passed


@pytest.mark.slow
@pytest.mark.parametrize("name", ["MobileNetV3Small", "MobileNetV3Large"])
def test_mobilenet_v3_hard_swish_ops(name):
    model = getattr(keras.applications, name)(weights=None, input_shape=(96, 96, 3))
    randomize_batchnorms(model)
    folded, report = fold_batchnorms(model)
    assert report.bn_total == count_batchnorms(model) and report.kept == []
    assert compare_models(model, folded, samples=1, batch_size=2, atol=0.0, rtol=RTOL).passed


@keras.saving.register_keras_serializable(package="keras_bn_ext_tests")
class _ConvBlock(layers.Layer):
    """A custom layer holding a conv and a BN: its call() is Python the graph cannot see."""

    def __init__(self, filters=4, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.conv = layers.Conv2D(filters, 3, padding="same")
        self.bn = layers.BatchNormalization()

    def call(self, x, training=None):
        return self.bn(self.conv(x), training=training)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


def test_bns_inside_custom_layers_are_counted_and_kept_with_a_reason():
    # inline=False keeps every custom layer (tests/test_inline.py has the default).
    inputs = keras.Input((6, 6, 3))
    h = BatchNormalization(name="outer")(layers.Conv2D(4, 3, name="c")(inputs))
    model = keras.Model(inputs, _ConvBlock(name="block")(h))
    randomize_batchnorms(model)
    folded, report = fold_batchnorms(model, inline=False)
    assert report.bn_total == count_batchnorms(model) == 2 and report.bn_folded == 1
    (kept,) = report.kept
    assert kept.bn.startswith("block/") and "inside custom layer 'block' (_ConvBlock)" in kept.reason
    assert compare_models(model, folded, atol=0.0, rtol=RTOL).passed


def test_sequential_holding_a_nested_model_after_other_layers_folds():
    # The nested model is rebuilt before the outer Sequential has built the layers
    # copied ahead of it: their weights must wait for it (this once raised).
    inner_in = keras.Input((6, 6, 4))
    inner = keras.Model(inner_in, BatchNormalization(name="inner_bn")(layers.Conv2D(4, 3, name="ic")(inner_in)),
                        name="inner")
    model = keras.Sequential([keras.Input((8, 8, 3)), layers.Conv2D(4, 3, name="c"),
                              BatchNormalization(name="outer_bn"), inner])
    randomize_batchnorms(model)
    folded, report = fold_batchnorms(model)
    _check_folded(model, folded, report, expect_folded=2)


def test_bn_that_ends_a_nested_sequential_folds():
    features = keras.Sequential([keras.Input((8, 8, 3)), layers.Conv2D(4, 3, name="c"),
                                 BatchNormalization(name="last_bn")], name="features")
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, layers.GlobalAveragePooling2D(name="pool")(features(inputs)))
    randomize_batchnorms(model)
    folded, report = fold_batchnorms(model)
    _check_folded(model, folded, report, expect_folded=1)
    assert report.folded[0].bn == "features/last_bn" and folded.output_names == model.output_names


@pytest.mark.parametrize("bn_class", ["keras_bn_ext", "keras"])
def test_renorm_bn_folds_exactly(bn_class, tmp_path):
    # In inference a renorm BN is the moving-statistics affine map: it folds like any BN.
    cls = BatchNormalization if bn_class == "keras_bn_ext" else layers.BatchNormalization
    inputs = keras.Input((6, 6, 3))
    h = cls(renorm=True, renorm_clipping={"rmax": 2.0, "dmax": 1.0}, momentum=0.5, name="bn")(
        layers.Conv2D(4, 3, name="c")(inputs))
    model = keras.Model(inputs, layers.ReLU()(h))
    model.compile("sgd", "mse")
    rng = np.random.default_rng(0)
    model.fit(rng.normal(1, 2, (32, 6, 6, 3)), rng.normal(size=(32, 4, 4, 4)), epochs=2, verbose=0)
    assert float(np.abs(keras.ops.convert_to_numpy(model.get_layer("bn").moving_mean)).max()) > 0.01
    folded, report = fold_batchnorms(model)
    _check_folded(model, folded, report, expect_folded=1)


def test_float64_twin_computes_the_same_function_in_float64():
    from keras_bn_ext.rebuild import with_dtype

    model = _ops_model()
    twin = with_dtype(model, "float64")
    assert all(keras.backend.standardize_dtype(w.dtype) == "float64" for w in twin.weights)
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 3))
    ours = model(x.astype("float32"), training=False)
    exact = twin(x, training=False)
    for key in ours:
        assert keras.backend.standardize_dtype(exact[key].dtype) == "float64"
        # float32 against float64 on a shallow model: rounding only, ~1e-7 relative.
        assert_close(ours[key], exact[key], rtol=1e-5, what=key)


@keras.saving.register_keras_serializable(package="keras_bn_ext_tests")
class _ConfigDoesNotRoundTrip(layers.Layer):
    """get_config() returns a key __init__ rejects (keras_hub's MiT encoder layers do)."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1], 3), initializer="glorot_uniform")

    def call(self, x):
        return keras.ops.matmul(x, self.w)

    def get_config(self):
        return {**super().get_config(), "made_by_parent": True}


def test_a_layer_its_config_cannot_recreate_is_used_as_it_is(tmp_path):
    # Folding and export work; a saved file would not load, and fold_to_file says which layer.
    from keras_bn_ext.export.onnx.convert import export_onnx
    from keras_bn_ext.export.onnx.options import OnnxOptions
    from keras_bn_ext.export.onnx.verify import verify_onnx
    from keras_bn_ext.folding.save import fold_to_file

    inputs = keras.Input((6,))
    x = BatchNormalization(name="bn")(layers.Dense(4, name="d")(inputs))
    model = keras.Model(inputs, _ConfigDoesNotRoundTrip(name="odd")(x))
    randomize_batchnorms(model)
    folded, report = fold_batchnorms(model)
    assert report.bn_folded == 1 and report.not_recreated == ["odd (_ConfigDoesNotRoundTrip)"]
    assert folded.get_layer("odd") is model.get_layer("odd")
    assert compare_models(model, folded, atol=0.0, rtol=RTOL).passed
    result = fold_to_file(model, tmp_path / "f.keras")
    assert result.output is None and "odd (_ConfigDoesNotRoundTrip)" in result.reload_error
    assert not (tmp_path / "f.keras").exists()
    if keras.backend.backend() == "tensorflow":
        export_onnx(model, tmp_path / "m.onnx")
        assert verify_onnx(model, tmp_path / "m.onnx", onnx=OnnxOptions(provider="cpu")).passed


def test_a_bn_the_model_holds_but_never_calls_is_counted_as_unused():
    # As BASNet holds its whole image encoder but calls only some of its layers.
    inputs = keras.Input((6,))
    model = keras.Model(inputs, BatchNormalization(name="bn")(layers.Dense(4, name="d")(inputs)))
    model.spare = layers.BatchNormalization(name="spare_bn")
    model.spare.build((None, 4))
    randomize_batchnorms(model)
    folded, report = fold_batchnorms(model)
    assert count_batchnorms(model) == report.bn_total == 2 and report.bn_folded == 1
    assert [u.bn for u in report.unused] == ["spare_bn"] and "never called" in report.unused[0].reason
    assert count_batchnorms(folded) == 0
    assert compare_models(model, folded, atol=0.0, rtol=RTOL).passed


def test_every_kept_bn_has_a_stable_code():
    """Reports carry a code beside the prose (tools/zoo.py counts codes, never words)."""
    from keras_bn_ext.folding.analysis import KEPT_CODES

    inputs = keras.Input((8, 8, 3))
    a = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    a = keras.layers.BatchNormalization(name="after_relu")(a)  # producer has an activation
    b = keras.layers.Conv2D(4, 3)(inputs)
    b = keras.layers.BatchNormalization(name="after_add")(keras.layers.Add()([a, b]))
    model = keras.Model(inputs, keras.layers.Conv2D(2, 1, padding="same")(b))
    _, report = fold_batchnorms(model)
    codes = {k.bn: k.code for k in report.kept}
    assert codes == {"after_relu": "producer_activation", "after_add": "input_not_conv_dense"}
    assert all(k.code in KEPT_CODES for k in report.kept)


# --- folds found on third-party nets (issue 26): through Concatenate, through averages, Lambda ---

@pytest.mark.parametrize("join", ["layer", "ops"])
def test_bn_after_concatenate_folds_slice_by_slice(join):
    # ResNeSt's pattern: separately foldable convs joined on the channel axis, then one BN
    # (a Concatenate layer, or keras.ops.concatenate as keras.ops-built zoos write it).
    x = keras.Input((10, 10, 3))
    parts = [layers.Conv2D(4, 3, padding="same")(x), layers.Conv2D(5, 1, use_bias=False)(x),
             layers.DepthwiseConv2D(3, padding="same")(x)]
    joined = layers.Concatenate(name="concatenate")(parts) if join == "layer" else \
        keras.ops.concatenate(parts, axis=-1)
    y = layers.ReLU()(layers.BatchNormalization()(joined))
    model = keras.Model(x, y)
    randomize_batchnorms(model)
    folded, report = fold_batchnorms(model)
    _check_folded(model, folded, report, expect_folded=1)
    assert report.folded[0].into.startswith("conv2d+conv2d_1+depthwise_conv2d (through concatenate")


@pytest.mark.parametrize("blocker", ["relu", "shared", "axis"])
def test_concatenate_slices_keep_the_bn_when_one_input_cannot_take_it(blocker):
    x = keras.Input((8, 8, 3))
    a = layers.Conv2D(4, 3, padding="same", activation="relu" if blocker == "relu" else None)(x)
    b = layers.Conv2D(4 if blocker == "axis" else 2, 1)(x)  # joined on the height axis: same channels
    extra = [layers.ReLU()(b)] if blocker == "shared" else []
    joined = layers.Concatenate(axis=1 if blocker == "axis" else -1)([a, b])
    bn = layers.BatchNormalization(axis=1 if blocker == "axis" else -1)
    model = keras.Model(x, [bn(joined)] + extra)
    randomize_batchnorms(model)
    folded, report = fold_batchnorms(model)
    assert report.bn_folded == 0 and report.kept[0].code == "input_not_conv_dense"
    assert "not per slice" in report.kept[0].reason


@pytest.mark.parametrize("pool", ["gap", "gap_keepdims", "avg_valid"])
def test_bn_folds_forward_through_an_average(pool):
    # EfficientFormerV2's BN -> GlobalAveragePooling -> Dense: averaging commutes with a
    # per-channel affine map, so the BN folds into the Dense (or a 'valid' 1x1 conv).
    x = keras.Input((8, 8, 3))
    h = layers.BatchNormalization()(layers.Conv2D(6, 3, activation="relu")(x))
    if pool == "gap":
        y = layers.Dense(3)(layers.GlobalAveragePooling2D()(h))
    elif pool == "gap_keepdims":
        y = layers.Conv2D(3, 1)(layers.GlobalAveragePooling2D(keepdims=True)(h))
    else:
        y = layers.Conv2D(3, 1)(layers.AveragePooling2D(2)(h))
    model = keras.Model(x, y)
    randomize_batchnorms(model)
    folded, report = fold_batchnorms(model)
    _check_folded(model, folded, report, expect_folded=1)
    assert report.folded[0].direction == "forward"


def test_same_padded_average_pooling_keeps_the_bn():
    x = keras.Input((8, 8, 3))
    h = layers.BatchNormalization()(layers.Conv2D(6, 3, activation="relu")(x))
    model = keras.Model(x, layers.Conv2D(3, 1)(layers.AveragePooling2D(3, strides=2, padding="same")(h)))
    randomize_batchnorms(model)
    _, report = fold_batchnorms(model)
    assert report.bn_folded == 0


def test_a_lambda_layer_is_rebuilt_from_its_function():
    # Its config holds bytecode that reloads without the globals it reads (`keras`).
    x = keras.Input((10, 10, 3))
    h = layers.BatchNormalization()(layers.Conv2D(4, 3)(x))
    h = layers.Lambda(lambda t: keras.activations.gelu(t, approximate=True))(h)
    model = keras.Model(x, layers.Dense(3)(layers.Flatten()(layers.BatchNormalization()(h))))
    randomize_batchnorms(model)
    folded, report = fold_batchnorms(model)
    _check_folded(model, folded, report, expect_folded=2)
