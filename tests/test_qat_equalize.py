"""Cross-layer equalization before the BN fold (`qat.equalize`): exact against the model it
came from in inference *and* in training (batch statistics), the folded ranges evened, and
what it is for: a per-tensor 4-bit twin of a trained depthwise net, on real digits."""

import keras
import numpy as np

from keras_bn_ext.qat import QuantizedConv, quantize_model
from keras_bn_ext.qat.equalize import equalize_unfolded
from keras_bn_ext.qat.pairs import fused_pairs
from tests.helpers import int8_fixture, mnist_digits


def _folded_kernel_spread(qat) -> float:
    """The largest ratio of per-channel weight ranges within one folded kernel."""
    worst = 1.0
    for layer in qat.layers:
        if isinstance(layer, QuantizedConv) and layer.batchnorm is not None:
            kernel = layer.folded_weights()[0]
            kernel = kernel.reshape(-1, kernel.shape[-2] * kernel.shape[-1]) if layer.channel_axes == 2 \
                else kernel.reshape(-1, kernel.shape[-1])
            peak = np.max(np.abs(kernel), axis=0)
            worst = max(worst, float(np.max(peak) / np.min(peak[peak > 0])))
    return worst


def test_equalized_model_is_exact_in_inference_and_in_training():
    (x_train, _), _ = mnist_digits()
    model = int8_fixture("dwsep")
    x = x_train[:256]
    equalized, report = equalize_unfolded(model, fused_pairs(model), [x])
    assert len(report.pairs) >= 4 and equalized is not model
    assert max(p.max_scale for p in report.pairs) > 2  # the fixture's ranges were far apart
    # BNs stay (QAT trains them); only gamma/beta and the next kernels moved.
    assert sum(isinstance(v, keras.layers.BatchNormalization) for v in equalized.layers) == 9
    for training in (False, True):
        # float32: sums of a few hundred products, ~1e-6 of the output; BN's output divided by
        # s and the next kernel multiplied by s, so only round-off differs: 1e-4 leaves margin
        # (a wrong channel errs by O(1)). In training both use their own batch statistics.
        a = keras.ops.convert_to_numpy(model(x, training=training))
        b = keras.ops.convert_to_numpy(equalized(x, training=training))
        assert np.max(np.abs(a - b)) <= 1e-4 * np.max(np.abs(a)), training


def test_per_tensor_twin_is_equalized_by_default_and_starts_far_closer_to_float():
    (x_train, _), (x_test, y_test) = mnist_digits()
    model = int8_fixture("dwsep")

    def accuracy(m):
        return float((np.argmax(m.predict(x_test, verbose=0, batch_size=500), 1) == y_test).mean())

    plain = quantize_model(model, calibration=x_train[:512], weight_bits=4, per_channel=False, equalize="off")
    auto = quantize_model(model, calibration=x_train[:512], weight_bits=4, per_channel=False)
    assert _folded_kernel_spread(auto) < _folded_kernel_spread(plain) / 2
    # Untrained (= post-training 4-bit per tensor): 52% without, 86% with, float 94.3%.
    assert accuracy(auto) >= accuracy(plain) + 0.2
