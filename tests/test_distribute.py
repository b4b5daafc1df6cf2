"""synchronized=True under tf.distribute.MirroredStrategy on two logical CPU devices."""

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
