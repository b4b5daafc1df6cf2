"""Property: over random small architectures, the folded model equals the original."""

import keras
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from keras import layers

from keras_bn_ext import BatchNormalization, compare_models, fold_batchnorms
from keras_bn_ext.testing import randomize_batchnorms

PRODUCERS_2D = {
    "conv": lambda c: layers.Conv2D(c, 3, padding="same"),
    "conv_nobias": lambda c: layers.Conv2D(c, 3, padding="same", use_bias=False),
    "conv_groups": lambda c: layers.Conv2D(2 * c, 3, padding="same", groups=2),
    "depthwise": lambda c: layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2),
    "separable": lambda c: layers.SeparableConv2D(c, 3, padding="same", depth_multiplier=2),
    "transpose": lambda c: layers.Conv2DTranspose(c, 3, padding="same"),
    "conv_relu": lambda c: layers.Conv2D(c, 3, padding="same", activation="relu"),
    "conv_valid_1x1": lambda c: layers.Conv2D(c, 1, padding="valid"),  # a forward target
}
AFTER = {
    "relu": lambda: layers.ReLU(),
    "sigmoid": lambda: layers.Activation("sigmoid"),
    "none": None,
    "pool": lambda: layers.MaxPooling2D(2, padding="same"),
}

block = st.tuples(
    st.sampled_from(sorted(PRODUCERS_2D)),
    st.sampled_from(["ours", "keras", "none"]),
    st.booleans(),  # center
    st.booleans(),  # scale
    st.sampled_from(sorted(AFTER)),
    st.integers(2, 5),  # channels
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocks=st.lists(block, min_size=1, max_size=4), dense_bn=st.booleans(), seed=st.integers(0, 99))
def test_folded_equals_original(blocks, dense_bn, seed):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 4))
    h = inputs
    for producer, bn_kind, center, scale, after, channels in blocks:
        if producer == "conv_groups" and h.shape[-1] % 2:
            producer = "conv"  # groups=2 needs an even number of input channels
        h = PRODUCERS_2D[producer](channels)(h)
        if bn_kind == "ours":
            h = BatchNormalization(center=center, scale=scale)(h)
        elif bn_kind == "keras":
            h = layers.BatchNormalization(center=center, scale=scale, epsilon=1e-3)(h)
        if AFTER[after] is not None:
            h = AFTER[after]()(h)
    h = layers.Dense(4)(layers.Flatten()(h))
    if dense_bn:
        h = BatchNormalization()(h)
    model = keras.Model(inputs, layers.Activation("tanh")(h))
    randomize_batchnorms(model, seed=seed)
    folded, report = fold_batchnorms(model)
    # A few float32 roundings per layer, on at most five layers.
    cmp = compare_models(model, folded, samples=1, batch_size=2, seed=seed, atol=0.0, rtol=1e-5)
    assert cmp.passed, (cmp, report)
    assert report.bn_folded == _expected_folds(blocks) + int(dense_bn), report


def _expected_folds(blocks):
    """Every BN after a linear producer folds backward. A BN after conv_relu folds forward
    only when nothing sits between it and the next layer and that layer pads nothing:
    the 1x1 valid conv of the next block, or the final Flatten -> Dense."""
    count = 0
    for i, (producer, bn_kind, _, _, after, _) in enumerate(blocks):
        if bn_kind == "none":
            continue
        if producer != "conv_relu":
            count += 1
        elif after == "none":
            last = i == len(blocks) - 1
            count += int(last or blocks[i + 1][0] == "conv_valid_1x1")
    return count
