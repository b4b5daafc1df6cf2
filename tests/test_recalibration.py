"""`recalibrate_batchnorms` against independent oracles: numpy statistics of each BN's
inputs, computed by calling the model's own layers one by one (exact mode), and numpy
running averages of per-batch statistics with numpy batch normalization (running mode).

Backend-agnostic (eager Keras only): CI also runs this file under JAX and PyTorch
(test_backends.py); the LeNet test trains, so it runs on TensorFlow only.
"""

import os

import keras
import numpy as np
import pytest

from keras_bn_ext import BatchNormalization
from keras_bn_ext.errors import InputDataError
from keras_bn_ext.recalibration import recalibrate_batchnorms
from keras_bn_ext.testing import randomize_batchnorms
from tests.helpers import REPO, assert_close

layers = keras.layers
RNG = np.random.default_rng(3)


def _np(t):
    return np.asarray(keras.ops.convert_to_numpy(keras.ops.stop_gradient(t)), np.float64)


def _masked_moments(x, mask):
    """Per last-axis channel over the kept positions, float64."""
    values = x[mask] if mask is not None else x.reshape(-1, x.shape[-1])
    return values.mean(0), values.var(0)


def _sequence_model():
    """Embedding(mask_zero) -> Dense -> BN -> ReLU -> nested model [Dense -> frozen BN] ->
    our BN -> masked pooling: three BNs, one nested, one frozen, all fed masks."""
    ids = keras.Input((9,), dtype="int32", name="ids")
    h = layers.Embedding(30, 6, mask_zero=True, name="emb")(ids)
    h = layers.Dense(5, name="d1")(h)
    h = layers.ReLU(name="r1")(layers.BatchNormalization(momentum=0.99, name="bn_a")(h))
    inner_in = keras.Input((9, 5))
    inner_bn = layers.BatchNormalization(name="bn_b")
    inner_bn.trainable = False
    inner = keras.Model(inner_in, inner_bn(layers.Dense(4, name="d2")(inner_in)), name="inner")
    h = BatchNormalization(name="bn_c")(inner(h))
    out = layers.Dense(3, name="head")(layers.GlobalAveragePooling1D()(h))
    model = keras.Model(ids, out)
    randomize_batchnorms(model)  # far-off statistics: recalibration must move them
    return model


def _sequence_data(n=70):
    ids = RNG.integers(1, 30, size=(n, 9)).astype("int32")
    lengths = RNG.integers(2, 10, size=n)
    ids[np.arange(9)[None, :] >= lengths[:, None]] = 0  # padded tails
    return ids


def _sequence_oracle(model, ids):
    """Each BN's inputs by calling the recalibrated model's layers in order, eagerly."""
    mask = ids != 0
    emb, d1, bn_a, r1 = (model.get_layer(n) for n in ("emb", "d1", "bn_a", "r1"))
    inner = model.get_layer("inner")
    d2, bn_b = inner.get_layer("d2"), inner.get_layer("bn_b")
    h = d1(emb(ids))
    stats = {"bn_a": _masked_moments(_np(h), mask)}
    g = d2(r1(bn_a(h, training=False)))
    stats["bn_b"] = _masked_moments(_np(g), mask)
    stats["bn_c"] = _masked_moments(_np(bn_b(g, training=False)), mask)
    return stats


# Keras warns that the nested Functional "destroys" the mask; in a call its layers still
# read it from the tensor, and the BNs' statistics below show that they do.
@pytest.mark.filterwarnings("ignore:Layer 'inner'")
@pytest.mark.parametrize("batch_size", [16, 70])
def test_exact_matches_numpy_statistics_with_masks_nesting_and_a_frozen_bn(batch_size):
    model = _sequence_model()
    ids = _sequence_data()
    start = _np(model.get_layer("bn_a").moving_mean)
    report = recalibrate_batchnorms(model, {"ids": ids}, batch_size=batch_size)
    oracle = _sequence_oracle(model, ids)
    bns = {"bn_a": model.get_layer("bn_a"), "bn_b": model.get_layer("inner").get_layer("bn_b"),
           "bn_c": model.get_layer("bn_c")}
    for name, (mean, var) in oracle.items():
        # float64 sums of float32 activations: 1e-5 relative to the largest statistic.
        assert_close(bns[name].moving_mean, mean, what=f"{name} mean")
        assert_close(bns[name].moving_variance, var, what=f"{name} variance")
    by_name = {b.bn: b for b in report.batchnorms}
    assert set(by_name) == {"bn_a", "inner/bn_b", "bn_c"}
    assert [by_name[n].level for n in ("bn_a", "inner/bn_b", "bn_c")] == [1, 2, 3]
    assert report.levels == 3 and report.samples == 70 and report.batches == -(-70 // batch_size)
    kept = int((ids != 0).sum())
    assert by_name["bn_a"].values_per_channel == kept  # padded positions never counted
    np.testing.assert_array_equal(by_name["bn_a"].old_mean, start)  # the statistics before, as they were
    assert_close(by_name["bn_a"].new_mean, oracle["bn_a"][0], what="reported new mean")
    assert by_name["bn_a"].mean_shift > 0.1  # randomized statistics were far from the data's


@pytest.mark.filterwarnings("ignore:Layer 'inner'")
def test_frozen_bns_can_be_left_alone():
    model = _sequence_model()
    frozen = model.get_layer("inner").get_layer("bn_b")
    before = _np(frozen.moving_mean)
    report = recalibrate_batchnorms(model, _sequence_data(), include_frozen=False)
    np.testing.assert_array_equal(_np(frozen.moving_mean), before)
    assert [(s.bn, s.code) for s in report.skipped] == [("inner/bn_b", "frozen")]
    assert len(report.batchnorms) == 2


def _conv_net():
    inputs = keras.Input((10, 10, 2))
    c1 = layers.Conv2D(4, 3, name="c1")
    c2 = layers.Conv2D(3, 3, name="c2")
    h = layers.ReLU()(layers.BatchNormalization(name="b1")(c1(inputs)))
    h = BatchNormalization(name="b2")(c2(h))
    model = keras.Model(inputs, layers.GlobalAveragePooling2D()(h))
    randomize_batchnorms(model)
    return model


def test_running_matches_numpy_running_average_of_batch_statistics():
    model = _conv_net()
    x = RNG.normal(size=(50, 10, 10, 2)).astype("float32") * 2 + 1
    c1, c2 = model.get_layer("c1"), model.get_layer("c2")
    b1 = model.get_layer("b1")
    gamma, beta = _np(b1.gamma), _np(b1.beta)
    stats = {"b1": [], "b2": []}
    for start in range(0, 50, 16):  # the numpy oracle, batch by batch
        h = _np(c1(x[start:start + 16]))
        mean, var = h.mean((0, 1, 2)), h.var((0, 1, 2))
        stats["b1"].append((mean, var))
        y = np.maximum((h - mean) / np.sqrt(var + b1.epsilon) * gamma + beta, 0.0)
        g = _np(c2(y.astype("float32")))
        stats["b2"].append((g.mean((0, 1, 2)), g.var((0, 1, 2))))
    report = recalibrate_batchnorms(model, x, mode="running", batch_size=16)
    assert report.mode == "running" and report.passes == 2 and report.batches == 4  # discovery + one
    for name, values in stats.items():
        bn = model.get_layer(name)
        assert_close(bn.moving_mean, np.mean([m for m, _ in values], 0), what=f"{name} mean")
        assert_close(bn.moving_variance, np.mean([v for _, v in values], 0), what=f"{name} variance")


def test_exact_and_running_agree_on_one_full_batch():
    """With the whole data in one batch, batch statistics are the data's statistics."""
    x = RNG.normal(size=(40, 10, 10, 2)).astype("float32")
    exact, running = _conv_net(), _conv_net()
    running.set_weights(exact.get_weights())
    recalibrate_batchnorms(exact, x, batch_size=40)
    recalibrate_batchnorms(running, x, mode="running", batch_size=40)
    for name in ("b1", "b2"):
        assert_close(running.get_layer(name).moving_variance, exact.get_layer(name).moving_variance,
                     what=name)


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = layers.Conv2D(3, 3), layers.BatchNormalization()
        self.c2, self.b2 = layers.Conv2D(2, 3), BatchNormalization()

    def call(self, x, training=None):
        h = keras.ops.relu(self.b1(self.c1(x), training=training))
        return self.b2(self.c2(h), training=training)


def test_subclassed_model_one_level_per_bn_in_call_order():
    model = _Subclassed()
    x = RNG.normal(size=(24, 8, 8, 2)).astype("float32")
    model(x)
    randomize_batchnorms(model)
    report = recalibrate_batchnorms(model, x, batch_size=10)
    assert [b.level for b in report.batchnorms] == [1, 2] and report.passes == 3
    h = _np(model.c1(x))
    assert_close(model.b1.moving_variance, h.var((0, 1, 2)), what="b1")
    g = _np(model.c2(keras.ops.relu(model.b1(h.astype("float32"), training=False))))
    assert_close(model.b2.moving_variance, g.var((0, 1, 2)), what="b2")


def test_shared_bn_pools_the_inputs_of_all_its_calls():
    a, b = keras.Input((4,)), keras.Input((4,))
    bn = layers.BatchNormalization(name="shared")
    model = keras.Model([a, b], layers.Concatenate()([bn(a), bn(layers.Dense(4)(b))]))
    xa = RNG.normal(size=(30, 4)).astype("float32")
    xb = RNG.normal(size=(30, 4)).astype("float32") * 5
    report = recalibrate_batchnorms(model, [xa, xb], batch_size=8)
    dense = next(layer for layer in model.layers if isinstance(layer, layers.Dense))
    pooled = np.concatenate([xa.astype(np.float64), _np(dense(xb))])
    assert_close(bn.moving_mean, pooled.mean(0), what="mean")
    assert_close(bn.moving_variance, pooled.var(0), what="variance")
    assert report.batchnorms[0].calls == 2 and report.batchnorms[0].samples == 60


def test_a_dataset_of_batches_and_a_generator():
    model = _conv_net()
    x = RNG.normal(size=(32, 10, 10, 2)).astype("float32")
    batches = [(x[i:i + 8], np.zeros(8)) for i in range(0, 32, 8)]  # (x, y) as fit() takes them
    report = recalibrate_batchnorms(model, batches)
    assert report.batch_size is None and report.batches == 4 and report.samples == 32
    reference = _conv_net()
    reference.set_weights(model.get_weights())
    recalibrate_batchnorms(reference, x, batch_size=32)
    assert_close(model.get_layer("b2").moving_variance, reference.get_layer("b2").moving_variance, what="b2")
    with pytest.raises(InputDataError, match="one-shot iterator"):
        recalibrate_batchnorms(model, (b for b in batches))
    recalibrate_batchnorms(model, (b for b in batches), mode="running")


@pytest.mark.filterwarnings("ignore:Layer 'inner'")
@pytest.mark.parametrize("data,needle", [
    ({"other": np.zeros((4, 9), "int32")}, "has no array 'ids'"),
    ({"ids": np.zeros((4, 7), "int32")}, r"expects shape \(None, 9\)"),
    ({"ids": np.zeros((0, 9), "int32")}, "no samples"),
    ({"ids": np.zeros((4, 9), "float32")}, "expects int32"),
])
def test_bad_data_is_refused_before_any_change(data, needle):
    model = _sequence_model()
    before = [_np(w) for w in model.weights]
    with pytest.raises(InputDataError, match=needle):
        recalibrate_batchnorms(model, data)
    for a, b in zip(before, model.weights):
        np.testing.assert_array_equal(a, _np(b))


def test_nan_in_a_later_batch_restores_every_bn():
    model = _conv_net()
    x = RNG.normal(size=(24, 10, 10, 2)).astype("float32")
    bad = x[:8].copy()
    bad[3, 4, 4, 1] = np.nan
    before = [_np(w) for w in model.weights]
    with pytest.raises(InputDataError, match="batch 2 of the dataset holds 1 NaN"):
        recalibrate_batchnorms(model, [x[:8], x[8:16], bad])
    for a, b in zip(before, model.weights):
        np.testing.assert_array_equal(a, _np(b))
    with pytest.raises(InputDataError, match="NaN or infinite"):
        recalibrate_batchnorms(model, np.where(x > 2, np.inf, x))


@pytest.mark.parametrize("kwargs,needle", [({"mode": "fast"}, "Received: mode='fast'"),
                                           ({"batch_size": 0}, "Received: batch_size=0")])
def test_bad_arguments(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        recalibrate_batchnorms(_conv_net(), np.zeros((2, 10, 10, 2), "float32"), **kwargs)


def test_renorm_bn_keeps_its_stddev_consistent():
    inputs = keras.Input((5,))
    bn = BatchNormalization(renorm=True, name="rn")
    model = keras.Model(inputs, bn(inputs))
    x = RNG.normal(size=(20, 5)).astype("float32") * 3
    recalibrate_batchnorms(model, x)
    assert_close(bn.moving_variance, x.astype(np.float64).var(0), what="variance")
    assert_close(bn.moving_stddev, np.sqrt(x.astype(np.float64).var(0) + bn.epsilon), what="stddev")


def test_uncalled_bn_is_reported_not_touched():
    inputs = keras.Input((4,))
    used, unused = layers.BatchNormalization(name="used"), layers.BatchNormalization(name="spare")
    unused.build((None, 4))
    model = keras.Model(inputs, used(inputs))
    model.spare = unused  # held, never called (as BASNet holds its encoder's unused BN)
    report = recalibrate_batchnorms(model, RNG.normal(size=(8, 4)).astype("float32"))
    assert [(s.bn, s.code) for s in report.skipped] == [("spare", "not_called")]


@pytest.mark.slow
@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="trains a network: once, on TensorFlow")
def test_lagging_statistics_of_a_trained_lenet_are_repaired():
    """The issue's case: Keras's momentum 0.99 over 3 short epochs leaves moving
    statistics far behind the weights; exact recalibration on 2,000 training digits
    brings inference back within 1 point of training-mode accuracy."""
    with np.load(os.path.join(REPO, "tools", "data", "mnist-10k.npz")) as d:
        x_train, y_train = d["x_train"][..., None] / 255.0, d["y_train"]
        x_test, y_test = d["x_test"][..., None] / 255.0, d["y_test"]
    keras.utils.set_random_seed(0)
    inputs = keras.Input((28, 28, 1), name="image")
    h = inputs
    for filters in (16, 32, 32):
        h = layers.Conv2D(filters, 3, padding="same")(h)
        h = layers.ReLU()(layers.BatchNormalization()(h))
        h = layers.MaxPooling2D()(h)
    h = layers.ReLU()(layers.BatchNormalization()(layers.Dense(64)(layers.Flatten()(h))))
    model = keras.Model(inputs, layers.Dense(10)(h))
    model.compile(keras.optimizers.Adam(1e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train.astype("float32"), y_train, batch_size=64, epochs=3, verbose=0)

    def accuracy(training):
        logits = np.concatenate([_np(model(x_test[i:i + 500].astype("float32"), training=training))
                                 for i in range(0, len(x_test), 500)])
        return float((logits.argmax(1) == y_test).mean())

    in_training = accuracy(True)
    before = accuracy(False)
    recalibrate_batchnorms(model, {"image": x_train[:2000].astype("float32")})
    after = accuracy(False)
    print(f"test accuracy: training mode {in_training:.4f}, inference before {before:.4f}, after {after:.4f}")
    assert after >= in_training - 0.01, (before, after, in_training)
    assert after > before


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="graph logic, backend-independent: once, on TensorFlow (eager JAX is slow on it)")
def test_replay_with_kept_activations_equals_recomputing_every_pass(monkeypatch):
    """Exact mode on a graph reuses final activations between levels; on a model nobody
    here wrote it must give bit for bit what recomputing the whole prefix every pass
    gives, and its last BN must hold the numpy statistics of its own inputs."""
    import keras_bn_ext.recalibration.statistics as statistics

    model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), alpha=0.35)
    randomize_batchnorms(model)
    start = model.get_weights()
    x = RNG.random((12, 32, 32, 3)).astype("float32")
    report = recalibrate_batchnorms(model, x, batch_size=5)
    replayed = model.get_weights()
    assert report.levels > 40 and report.kept_peak_mb > 0
    last = [layer for layer in model.layers if isinstance(layer, layers.BatchNormalization)][-1]
    h = _np(keras.Model(model.inputs, last.input)(x))
    assert_close(last.moving_variance, h.reshape(-1, h.shape[-1]).var(0), what="last BN variance")

    model.set_weights(start)
    monkeypatch.setattr(statistics._GraphReplay, "forward",
                        lambda self, level, index, batch: statistics._call(model, batch))
    recalibrate_batchnorms(model, x, batch_size=5)
    for a, b in zip(replayed, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_two_inputs_dict_outputs_and_dict_inputs():
    from tests.helpers import two_input_dict_model

    model = two_input_dict_model()
    data = {"image": RNG.random((20, 8, 8, 3)).astype("float32"), "meta": RNG.random((20, 5)).astype("float32")}
    report = recalibrate_batchnorms(model, data, batch_size=7)
    assert {b.bn: b.level for b in report.batchnorms} == {"bn1": 1, "bn2": 1}  # independent: one pass
    assert_close(model.get_layer("bn2").moving_variance, _np(model.get_layer("d")(data["meta"])).var(0),
                 what="bn2 variance")
    a, b = keras.Input((4,), name="a"), keras.Input((4,), name="b")
    bn = layers.BatchNormalization(name="bn")
    keyed = keras.Model({"a": a, "b": b}, bn(layers.Add()([a, b])))
    xa, xb = RNG.normal(size=(9, 4)).astype("float32"), RNG.normal(size=(9, 4)).astype("float32")
    recalibrate_batchnorms(keyed, {"b": xb, "a": xa}, batch_size=4)
    assert_close(bn.moving_mean, (xa.astype(np.float64) + xb).mean(0), what="mean")
