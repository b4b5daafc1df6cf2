"""Cross-layer equalization is an exact transform (verified against the model it came from,
like a fold) that evens out per-channel weight ranges; ReLU6 pairs are left alone unless
the caller asks for ReLU."""

import keras
import numpy as np

from keras_bn_ext import compare_models, fold_batchnorms
from keras_bn_ext.quantization.equalize import equalize_model
from tests.helpers import int8_fixture, mnist_digits


def _channel_spread(kernel):
    """max/min over output channels of each channel's weight range (1 = even)."""
    r = np.max(np.abs(kernel.reshape(-1, kernel.shape[-1])), axis=0)
    return float(np.max(r) / np.min(r))


def test_wide_range_net_is_equalized_exactly():
    (_, _), (x, _) = mnist_digits()
    folded, _ = fold_batchnorms(int8_fixture("wide_range"))
    before = [w.numpy().copy() for w in folded.weights]
    equalized, report = equalize_model(folded)
    # Equalization reorders float32 products like a fold does: 1e-5 of the output's magnitude.
    assert compare_models(folded, equalized, inputs=[x[:256]]).max_rel_err < 1e-5
    assert [(p.first, p.second) for p in report.pairs] == [("conv1", "conv2"), ("conv2", "fc1"), ("fc1", "logits")]
    assert report.pairs[1].through[-1].startswith("flatten")  # conv2 -> ReLU -> MaxPool -> Flatten -> fc1
    # The fixture's channels were scaled over 1e-2..1e2: the spread collapses.
    assert _channel_spread(folded.get_layer("conv1").kernel.numpy()) > 1000
    assert _channel_spread(equalized.get_layer("conv1").kernel.numpy()) < 20
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(before, folded.weights))  # input untouched


def test_depthwise_chains_are_swept_until_settled():
    (_, _), (x, _) = mnist_digits()
    folded, _ = fold_batchnorms(int8_fixture("dwsep"))
    equalized, report = equalize_model(folded)
    kinds = {(type(equalized.get_layer(p.first)).__name__, type(equalized.get_layer(p.second)).__name__)
             for p in report.pairs}
    assert {("Conv2D", "DepthwiseConv2D"), ("DepthwiseConv2D", "Conv2D"), ("Conv2D", "Dense")} <= kinds
    assert compare_models(folded, equalized, inputs=[x[:256]]).max_rel_err < 1e-5


def test_sigmoid_lenet_has_nothing_to_equalize():
    folded, _ = fold_batchnorms(int8_fixture("lenet_bn"))
    equalized, report = equalize_model(folded)
    assert equalized is folded and not report.pairs
    assert {s.code for s in report.skipped} == {"not_homogeneous"}


def test_relu6_pairs_are_kept_unless_replaced():
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), alpha=0.35, include_top=False,
                                           pooling="avg")
    folded, _ = fold_batchnorms(model)
    _, report = equalize_model(folded)
    # Only the linear projection -> next expansion pairs (no ReLU6 between them) are equalized.
    assert report.pairs and all(p.first.endswith("_project") and not p.through for p in report.pairs)
    assert "relu6" in {s.code for s in report.skipped}
    plain_pairs = len(report.pairs)
    # Large inputs, so that some activations pass 6 and ReLU6 and ReLU differ.
    x = np.random.default_rng(0).uniform(-100, 100, (4, 32, 32, 3)).astype("float32")
    relu, _ = equalize_model(folded, relu6_to_relu=True, scale=False)
    equalized, report = equalize_model(folded, relu6_to_relu=True)
    assert len(report.pairs) > plain_pairs and report.relu6_replaced
    # Exact against the model with ReLU (the function it was asked to become), not ReLU6.
    assert compare_models(relu, equalized, inputs=[x]).max_rel_err < 1e-5
    assert compare_models(folded, relu, inputs=[x]).max_rel_err > 1e-2  # ReLU6 -> ReLU did change it


def test_other_homogeneous_paths_and_exact_bias_absorption():
    keras.utils.set_random_seed(1)
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", bias_initializer="random_normal")(inputs)
    x = keras.layers.LeakyReLU(0.1)(x)
    x = keras.layers.AveragePooling2D(2)(x)
    x = keras.layers.Conv2D(8, 1, bias_initializer="random_normal")(x)  # linear, then a valid conv
    x = keras.layers.Dropout(0.5)(x)
    x = keras.layers.Conv2D(6, 3, padding="valid", bias_initializer="random_normal")(x)
    x = keras.layers.PReLU(alpha_initializer="random_uniform")(x)
    x = keras.layers.GlobalMaxPooling2D()(x)
    outputs = keras.layers.Dense(4)(x)
    model = keras.Model(inputs, outputs)
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):  # uneven channels
            k = layer.kernel.numpy()
            layer.kernel.assign(k * np.logspace(-1.5, 1.5, k.shape[-1]))
    equalized, report = equalize_model(model)
    assert len(report.pairs) == 3
    absorbed = [p for p in report.pairs if p.bias_absorbed]
    assert [p.first for p in absorbed] == [model.layers[4].name]  # the linear 1x1 conv -> valid conv
    assert not np.any(equalized.get_layer(model.layers[4].name).bias.numpy())
    x = np.random.default_rng(1).normal(size=(8, 12, 12, 3)).astype("float32")
    assert compare_models(model, equalized, inputs=[x]).max_rel_err < 1e-5


def test_channels_first_is_left_alone():
    inputs = keras.Input((3, 8, 8))
    x = keras.layers.Conv2D(4, 3, data_format="channels_first", activation="relu")(inputs)
    outputs = keras.layers.Conv2D(4, 3, data_format="channels_first")(x)
    _, report = equalize_model(keras.Model(inputs, outputs))
    assert [s.code for s in report.skipped] == ["channels"]
