"""synchronized=True under tf.distribute.MirroredStrategy on two logical CPU devices, and a QAT
twin under keras.distribution.DataParallel on two JAX host devices."""

import importlib.util
import keras
import pytest

from tests.helpers import run_python

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="tf.distribute needs TensorFlow"
)

SCRIPT = """
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from keras_bn_ext import BatchNormalization

rng = np.random.default_rng(0)
# The two halves differ on purpose: per-replica statistics would differ from global ones.
x = np.concatenate([rng.normal(0, 1, (8, 5, 3)), rng.normal(4, 3, (8, 5, 3))]).astype("float32")

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
assert strategy.num_replicas_in_sync == 2
results = {}
for synchronized in (True, False):
    with strategy.scope():
        layer = BatchNormalization(synchronized=synchronized)
        layer.build((None, 5, 3))
    @tf.function
    def step(batch):
        return layer(batch, training=True)
    dataset = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices(x).batch(16))
    for batch in dataset:
        strategy.run(step, args=(batch,))
    results[synchronized] = (layer.moving_mean.numpy(), layer.moving_variance.numpy())

single = BatchNormalization()
single(x, training=True)
ref = (single.moving_mean.numpy(), single.moving_variance.numpy())
# E[x^2] - E[x]^2 in float32 on values ~5: round-off ~1e-6 of 25; 1e-5 leaves margin.
for a, b in zip(results[True], ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
# Without synchronization each replica keeps its own half's statistics (MirroredVariable
# updates are averaged): the variance misses the between-halves spread.
assert not np.allclose(results[False][1], ref[1], rtol=1e-2)
print("OK")
"""


def test_synchronized_equals_one_replica_on_whole_batch():
    assert "OK" in run_python(SCRIPT)


QAT_SCRIPT = """
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from keras_bn_ext import BatchNormalization
from keras_bn_ext.qat import QuantizedConv, quantize_model

rng = np.random.default_rng(0)
# The two halves differ on purpose: per-replica statistics would differ from global ones.
x = np.concatenate([rng.normal(0, 1, (8, 6, 6, 3)), rng.normal(2, 3, (8, 6, 6, 3))]).astype("float32")

def model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 3))
    y = BatchNormalization(synchronized=True, momentum=0.9)(keras.layers.Conv2D(4, 3, padding="same")(inputs))
    y = keras.layers.Dense(2)(keras.layers.Flatten()(keras.layers.ReLU()(y)))
    return keras.Model(inputs, y)

def stats(qat):
    fused = next(l for l in qat.layers if isinstance(l, QuantizedConv) and l.batchnorm is not None)
    return [keras.ops.convert_to_numpy(v) for v in (fused.batchnorm.moving_mean, fused.batchnorm.moving_variance)]

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    mirrored = quantize_model(model(), calibration=x)
@tf.function
def step(batch):
    return mirrored(batch, training=True)
for batch in strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices(x).batch(16)):
    strategy.run(step, args=(batch,))
single = quantize_model(model(), calibration=x)
single(x, training=True)
for a, b in zip(stats(mirrored), stats(single)):
    assert np.max(np.abs(a - b)) <= 1e-6 * max(1.0, float(np.max(np.abs(b)))), (a, b)
print("OK", float(np.max(np.abs(stats(mirrored)[1] - stats(single)[1]))))
"""


def test_qat_twin_under_mirrored_strategy_has_the_statistics_of_one_replica():
    """A QAT twin trained under MirroredStrategy on two logical CPUs: its fused BN's moving
    statistics after a step equal one replica's on the whole batch (the layer's synchronized
    moments), to float32 round-off of E[x^2] - E[x]^2 on values ~3: 1e-6 relative."""
    assert "OK" in run_python(QAT_SCRIPT)


DATA_PARALLEL_SCRIPT = """
import numpy as np, jax, keras
from keras_bn_ext import BatchNormalization
from keras_bn_ext.qat import QuantizedConv, quantize_model

assert keras.backend.backend() == "jax" and len(jax.devices("cpu")) == 2, jax.devices()
rng = np.random.default_rng(0)
x = np.concatenate([rng.normal(0, 1, (8, 6, 6, 3)), rng.normal(2, 3, (8, 6, 6, 3))]).astype("float32")
y = np.array([0, 1] * 8)

def model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 3))
    h = BatchNormalization(momentum=0.9)(keras.layers.Conv2D(4, 3, padding="same")(inputs))
    h = keras.layers.Dense(2)(keras.layers.Flatten()(keras.layers.ReLU()(h)))
    return keras.Model(inputs, h)

def trained():
    qat = quantize_model(model(), calibration=x)
    qat.compile(optimizer=keras.optimizers.SGD(0.0), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qat.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    fused = next(l for l in qat.layers if isinstance(l, QuantizedConv) and l.batchnorm is not None)
    return [keras.ops.convert_to_numpy(v) for v in (fused.batchnorm.moving_mean, fused.batchnorm.moving_variance)], fused

keras.distribution.set_distribution(keras.distribution.DataParallel(devices=keras.distribution.list_devices("cpu")))
parallel, fused = trained()
assert "'batch': 2" in str(fused.batchnorm.moving_mean.value.sharding.mesh)
keras.distribution.set_distribution(None)
single, _ = trained()
for a, b in zip(parallel, single):
    assert np.max(np.abs(a - b)) <= 1e-6 * max(1.0, float(np.max(np.abs(b)))), (a, b)
print("OK", float(np.max(np.abs(parallel[1] - single[1]))), float(np.max(np.abs(single[1]))))
"""


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax not installed")
def test_qat_twin_under_jax_data_parallel_has_the_statistics_of_one_device():
    """keras.distribution.DataParallel on two host devices (JAX): `fit` shards each batch
    over the 'batch' mesh axis and XLA reduces the moments over the global batch, so the
    fused BN's moving statistics after a step equal one device's on the whole batch (halves
    drawn from different distributions: per-device statistics would differ), 1e-6 relative."""
    env = {"KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert "OK" in run_python(DATA_PARALLEL_SCRIPT, env=env)
