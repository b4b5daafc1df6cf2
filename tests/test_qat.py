"""Quantization-aware training: the fake-quantization arithmetic against ONNX's
QuantizeLinear, the fused conv + BN layer against Keras's own layers, and the trained
fixtures' QAT twins written from their learned ranges and run on onnxruntime's integer
kernels against their own simulation (real digits only)."""

import os

import keras
import numpy as np
import pytest

from keras_bn_ext.qat import ActivationQuantizer, QuantizedConv, is_qat_model, quantize_model
from keras_bn_ext.qat.quantizers import activation_params_np, fake_quant_activation, weight_qmax
from tests.helpers import REPO, int8_fixture, mnist_digits, run_python

TF = keras.backend.backend() == "tensorflow"


def _accuracy(model, x, y) -> float:
    return float((np.argmax(model.predict(x, verbose=0, batch_size=500), 1) == y).mean())


def test_activation_grid_is_onnx_quantize_linear():
    """x^ = (clip(round_half_even(x / s) + zp, 0, 255) - zp) * s, s and zp as the numpy twin says."""
    rng = np.random.default_rng(0)
    x = rng.normal(0, 2, 4096).astype("float32")
    for lo, hi in ((-1.3, 4.1), (0.0, 6.0), (-3.0, -1.0), (0.5, 2.0)):
        scale, zp = activation_params_np(lo, hi)
        expected = (np.clip(np.round(x / scale) + zp, 0, 255) - zp) * scale  # np.round: half to even
        got = keras.ops.convert_to_numpy(fake_quant_activation(keras.ops.convert_to_tensor(x), lo, hi))
        np.testing.assert_array_equal(got, expected.astype("float32"))
        assert 0 <= zp <= 255 and scale > 0
        # 0 is on the grid (onnxruntime requires it): the range always holds it.
        assert (0 - zp) * scale <= 0 <= (255 - zp) * scale


def _gradients(fn, x, lo, hi, upstream):
    """d sum(fn(x, lo, hi) * upstream) / d(x, lo, hi), on whichever backend runs."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        variables = [tf.Variable(x), tf.Variable(np.float32(lo)), tf.Variable(np.float32(hi))]
        with tf.GradientTape() as tape:
            total = tf.reduce_sum(fn(*variables) * upstream)
        grads = tape.gradient(total, variables)
    elif backend == "jax":
        import jax

        grads = jax.grad(lambda *a: (fn(*a) * upstream).sum(), argnums=(0, 1, 2))(x, np.float32(lo), np.float32(hi))
    else:
        import torch

        tensors = [torch.tensor(v, requires_grad=True) for v in (x, np.float32(lo), np.float32(hi))]
        (fn(*tensors) * torch.tensor(upstream)).sum().backward()
        grads = [t.grad for t in tensors]
    return [keras.ops.convert_to_numpy(g) for g in grads]


def test_activation_gradient_is_fake_quant_with_min_max_vars():
    """Straight-through inside the range, the range ends learning from what they clip:
    TensorFlow's FakeQuantWithMinMaxVarsGradient, written here in numpy (and, on TensorFlow,
    checked against that op too; the ranges are on the grid, where TF's nudging is a no-op).
    Sums of ~100 float32 terms: rtol 1e-5."""
    rng = np.random.default_rng(0)
    x = rng.normal(0, 2, (8, 5, 5, 3)).astype("float32")
    upstream = rng.normal(0, 1, x.shape).astype("float32")
    for lo, hi in ((-1.3, 4.1), (0.5, 2.0), (-3.0, -1.0)):
        d_x, d_lo, d_hi = _gradients(fake_quant_activation, x, lo, hi, upstream)
        low, high = min(lo, 0.0), max(hi, 0.0)
        np.testing.assert_array_equal(d_x, upstream * ((x >= low) & (x <= high)))
        np.testing.assert_allclose(d_lo, np.sum(upstream * (x < low)) if lo <= 0 else 0.0, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(d_hi, np.sum(upstream * (x > high)) if hi >= 0 else 0.0, rtol=1e-5, atol=1e-6)
        if TF:
            import tensorflow as tf

            scale, zp = activation_params_np(lo, hi)
            grid_lo, grid_hi = float(-zp * scale), float((255 - zp) * scale)
            tf_grads = tf.quantization.fake_quant_with_min_max_vars_gradient(upstream, x, grid_lo, grid_hi)
            ours = _gradients(fake_quant_activation, x, grid_lo, grid_hi, upstream)
            for a, b in zip(ours, tf_grads):
                np.testing.assert_allclose(a, b.numpy(), rtol=1e-5, atol=1e-6)


def test_weight_grids():
    assert weight_qmax(8) == 127 and weight_qmax(4) == 7 and weight_qmax(8, reduce_range=True) == 63


def test_quantizers_validate_their_arguments():
    with pytest.raises(ValueError, match="Received: weight_bits=3"):
        QuantizedConv(keras.saving.serialize_keras_object(keras.layers.Dense(2)), weight_bits=3)
    with pytest.raises(ValueError, match="Received: unsigned=1"):
        ActivationQuantizer(unsigned=1)
    with pytest.raises(ValueError, match="Received: layer=Flatten"):
        QuantizedConv(keras.saving.serialize_keras_object(keras.layers.Flatten()))
    model = int8_fixture("dwsep")
    with pytest.raises(ValueError, match="Received: target='tflite'"):
        quantize_model(model, calibration=np.zeros((2, 28, 28, 1), "float32"), target="tflite")


def _conv_bn(seed=0):
    keras.utils.set_random_seed(seed)
    conv = keras.layers.Conv2D(6, 3, padding="same", use_bias=True)
    bn = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-3)
    x = keras.Input((8, 8, 3))
    model = keras.Model(x, keras.layers.ReLU()(bn(conv(x))))
    rng = np.random.default_rng(seed)
    bn.set_weights([rng.uniform(0.5, 1.5, 6), rng.normal(0, 0.2, 6), rng.normal(0, 0.2, 6), rng.uniform(0.5, 1.5, 6)])
    return model, conv, bn


def test_fused_layer_trains_as_conv_then_bn_and_infers_as_the_folded_layer():
    model, conv, bn = _conv_bn()
    x = np.random.default_rng(1).normal(0, 1, (16, 8, 8, 3)).astype("float32")
    qat = quantize_model(model, calibration=x)
    fused = next(layer for layer in qat.layers if isinstance(layer, QuantizedConv))
    # Inference: conv(x, q(w * gamma / sigma)) + folded bias, i.e. Keras's conv -> BN up to the
    # 8-bit weight grid: per-channel steps of max|w_f| / 127, ~0.4% of the largest weight, so
    # the outputs agree to ~1% of their magnitude (a wrong fold errs by O(1)).
    q_in = next(layer for layer in qat.layers if isinstance(layer, ActivationQuantizer))
    reference = keras.ops.convert_to_numpy(bn(conv(q_in(x)), training=False))
    got = keras.ops.convert_to_numpy(fused(q_in(x), training=False))
    assert np.max(np.abs(got - reference)) <= 1e-2 * np.max(np.abs(reference))
    # Training: batch statistics (the correction), and the moving statistics move as the BN
    # layer moves them (momentum 0.9), from the quantized layer's output in the float layer's
    # units: conv(x, q(w * gamma / sigma)) * sigma / gamma + b, computed here in numpy from
    # the folded grid kernel (the same float32 sums: rtol 1e-5 on the mean, 1e-4 on the
    # variance's squares).
    before = [np.array(v) for v in (bn.moving_mean, bn.moving_variance)]
    gamma, sigma = np.asarray(bn.gamma), np.sqrt(before[1] + bn.epsilon)
    x_q = keras.ops.convert_to_numpy(q_in(x))
    y_q = keras.ops.convert_to_numpy(keras.ops.conv(x_q, fused.folded_weights()[0], padding="same"))
    units = y_q * sigma / gamma + np.asarray(conv.bias)
    mean, var = np.mean(units, axis=(0, 1, 2)), np.var(units, axis=(0, 1, 2))
    y = conv(q_in(x))
    y_np = keras.ops.convert_to_numpy(y)
    # ... which are the float conv's statistics up to the weights' rounding (~1%).
    np.testing.assert_allclose(var, np.var(y_np, axis=(0, 1, 2)), rtol=2e-2)
    got = keras.ops.convert_to_numpy(fused(q_in(x), training=True))
    expected = keras.ops.convert_to_numpy(bn(y, training=True))
    assert np.max(np.abs(got - expected)) <= 1e-2 * np.max(np.abs(expected))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(fused.batchnorm.moving_mean),
                               0.9 * before[0] + 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(fused.batchnorm.moving_variance),
                               0.9 * before[1] + 0.1 * var, rtol=1e-4, atol=1e-6)


def test_a_channel_with_zero_gamma_keeps_its_statistics():
    """gamma = 0 folds the channel's kernel to 0 and its output to beta: its batch statistics
    say nothing, and they must not drag the moving variance to 0 (1 / sigma would explode
    when gamma trains away from 0)."""
    model, _, bn = _conv_bn()
    weights = bn.get_weights()
    weights[0][2] = 0.0
    bn.set_weights(weights)
    x = np.random.default_rng(1).normal(0, 1, (16, 8, 8, 3)).astype("float32")
    qat = quantize_model(model, calibration=x)
    fused = next(layer for layer in qat.layers if isinstance(layer, QuantizedConv))
    out = keras.ops.convert_to_numpy(fused(qat.layers[1](x), training=True))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out[..., 2], weights[1][2], rtol=0, atol=1e-6)  # beta
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(fused.batchnorm.moving_mean)[2], weights[2][2])
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(fused.batchnorm.moving_variance)[2], weights[3][2])
    assert np.all(keras.ops.convert_to_numpy(fused.batchnorm.moving_variance)[[0, 1, 3]] != weights[3][[0, 1, 3]])


def test_bn_freeze_stops_the_statistics_and_trains_the_inference_form():
    model, _, _ = _conv_bn()
    x = np.random.default_rng(1).normal(0, 1, (16, 8, 8, 3)).astype("float32")
    qat = quantize_model(model, calibration=x, bn_freeze_after=0)
    fused = next(layer for layer in qat.layers if isinstance(layer, QuantizedConv))
    q_in = qat.layers[1]
    before = keras.ops.convert_to_numpy(fused.batchnorm.moving_mean).copy()
    trained = keras.ops.convert_to_numpy(fused(q_in(x), training=True))
    inferred = keras.ops.convert_to_numpy(fused(q_in(x), training=False))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(fused.batchnorm.moving_mean), before)
    np.testing.assert_allclose(trained, inferred, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def digits():
    return mnist_digits()


def test_the_twin_of_a_trained_net_fuses_every_pair_and_starts_where_ptq_is(digits):
    (x_train, _), (x_test, y_test) = digits
    model = int8_fixture("dwsep")
    qat = quantize_model(model, calibration=x_train[:512])
    assert is_qat_model(qat) and not is_qat_model(model)
    fused = [layer for layer in qat.layers if isinstance(layer, QuantizedConv)]
    n_bn = sum(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)
    assert sum(f.batchnorm is not None for f in fused) == n_bn == 9
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in qat.layers)
    # Untrained, the twin computes what post-training quantization computes: within 0.5 pt
    # of float on the 2,000 test digits (its PTQ export: 94.30 -> 94.40).
    assert abs(_accuracy(qat, x_test, y_test) - _accuracy(model, x_test, y_test)) <= 0.005


@pytest.mark.skipif(not TF, reason="the export converts with tf2onnx")
@pytest.mark.parametrize("per_channel", [True, False])
def test_trained_twin_file_matches_its_simulation(digits, tmp_path, per_channel):
    """A few hundred QAT steps, then the INT8 file from the learned ranges, on onnxruntime's
    integer kernels: top-1 agreement with the QAT model >= 99.5%, accuracy within 0.3 pt."""
    import onnx
    import onnxruntime as ort

    from keras_bn_ext.export.int8 import export_int8

    (x_train, y_train), (x_test, y_test) = digits
    qat = quantize_model(int8_fixture("dwsep"), calibration=x_train[:512], per_channel=per_channel)
    qat.compile(optimizer=keras.optimizers.Adam(1e-4), loss="sparse_categorical_crossentropy")
    qat.fit(x_train[:3200], y_train[:3200], batch_size=64, epochs=1, verbose=0)
    path = tmp_path / "dwsep.qat.onnx"
    result = export_int8(qat, path, None, eval_data=[x_test], labels=y_test)
    out = result.fidelity.outputs[0]
    assert result.passed and result.calibration.method.startswith("learned")
    assert out.top1_agreement >= 0.995, out
    assert abs(out.accuracy_quantized - out.accuracy_float) <= 0.003, out
    assert out.accuracy_float == pytest.approx(_accuracy(qat, x_test, y_test), abs=1e-9)  # the reference is the twin
    # onnxruntime runs the convolutions on its integer kernels.
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops.count("QLinearConv") == 9 and "Conv" not in ops


@pytest.mark.skipif(not TF, reason="the export converts with tf2onnx")
def test_four_bit_twin_is_written_as_int4_at_opset_21(digits, tmp_path):
    """W4A8: the weights are stored as int4 (DequantizeLinear's type from opset 21, half the
    bytes of int8), and the file reproduces its simulation on onnxruntime (which dequantizes
    int4 weights to float: it has no int4 convolution kernel)."""
    import onnx
    from onnx import TensorProto

    from keras_bn_ext.export.int8 import export_int8

    (x_train, y_train), (x_test, y_test) = digits
    qat = quantize_model(int8_fixture("dwsep"), calibration=x_train[:512], weight_bits=4)
    qat.compile(optimizer=keras.optimizers.Adam(1e-4), loss="sparse_categorical_crossentropy")
    qat.fit(x_train[:1600], y_train[:1600], batch_size=64, epochs=1, verbose=0)
    path = tmp_path / "dwsep.w4.onnx"
    result = export_int8(qat, path, None, eval_data=[x_test], labels=y_test)
    out = result.fidelity.outputs[0]
    # Measured: agreement 99.55%, 93.15% simulated vs 93.05% in the file (float 94.30%); the
    # file's float convolutions sum in another order than TensorFlow's, which moves values
    # at rounding ties of the next quantization.
    assert result.passed and out.top1_agreement >= 0.99, out
    assert abs(out.accuracy_quantized - out.accuracy_float) <= 0.003, out
    proto = onnx.load(str(path))
    assert result.detail.weight_type == "int4" and result.detail.opset == 21  # the report says what the file holds
    assert next(o.version for o in proto.opset_import if o.domain == "") == 21
    weights = [t for t in proto.graph.initializer if t.name.endswith("_quantized") and t.data_type != TensorProto.INT32]
    assert len(weights) == 10 and all(t.data_type == TensorProto.INT4 for t in weights)


@pytest.mark.skipif(not TF, reason="the export converts with tf2onnx")
def test_a_float_graph_is_not_taken_for_a_qat_one(tmp_path):
    """write_qdq refuses weights that are not on their grid (a float model's export)."""
    from keras_bn_ext.errors import ExportError
    from keras_bn_ext.export.onnx.convert import export_onnx
    from keras_bn_ext.export.onnx.qat import write_qdq

    export_onnx(int8_fixture("dwsep"), tmp_path / "float.onnx")
    with pytest.raises(ExportError, match="not on a 127-level grid"):
        write_qdq(tmp_path / "float.onnx", tmp_path / "out.onnx", grids=[], qmax=127, per_channel=True)
    assert not (tmp_path / "out.onnx").exists()


def test_saved_twin_reloads_in_a_fresh_process(digits, tmp_path):
    (x_train, _), (x_test, _) = digits
    qat = quantize_model(int8_fixture("lenet_bn"), calibration=x_train[:256])
    qat.save(tmp_path / "lenet.qat.keras")
    np.save(tmp_path / "x.npy", x_test[:64])
    np.save(tmp_path / "expected.npy", keras.ops.convert_to_numpy(qat(x_test[:64], training=False)))
    out = run_python(
        "import numpy as np, keras, keras_bn_ext\n"
        f"m = keras.saving.load_model({str(tmp_path / 'lenet.qat.keras')!r})\n"
        f"x = np.load({str(tmp_path / 'x.npy')!r}); e = np.load({str(tmp_path / 'expected.npy')!r})\n"
        "from keras_bn_ext.qat import is_qat_model\n"
        "print(is_qat_model(m), float(np.max(np.abs(keras.ops.convert_to_numpy(m(x, training=False)) - e))))\n",
        env=dict(os.environ, PYTHONPATH=REPO))
    flag, diff = out.strip().splitlines()[-1].split()
    assert flag == "True" and float(diff) == 0.0


def test_the_twin_trains_with_plain_fit(digits):
    """model.fit with any optimizer and loss, on whichever backend runs the tests
    (tests/test_backends.py reruns this file under JAX and PyTorch)."""
    (x_train, y_train), (x_test, y_test) = digits
    qat = quantize_model(int8_fixture("lenet_bn"), calibration=x_train[:256], bn_freeze_after=20)
    fused = [layer for layer in qat.layers if isinstance(layer, QuantizedConv) and layer.batchnorm is not None]
    moving = [np.array(keras.ops.convert_to_numpy(f.batchnorm.moving_mean)) for f in fused]
    maxima = [float(keras.ops.convert_to_numpy(q.max_value)) for q in qat.layers if isinstance(q, ActivationQuantizer)]
    # After the freeze the net trains in its folded form, without normalization: the kernel's
    # gradient is scaled by gamma / sigma (~4x here), and SGD 0.01 with momentum 0.9 diverged
    # in the second epoch (loss 0.14 -> 1.5-2.0). RMSprop at a fine-tuning rate trains, and
    # its normalized steps move the ranges too (SGD 0.002's steps on them are below an ulp).
    qat.compile(optimizer=keras.optimizers.RMSprop(1e-4), loss="sparse_categorical_crossentropy")
    history = qat.fit(x_train[:1280], y_train[:1280], batch_size=64, epochs=2, verbose=0)
    assert all(np.isfinite(history.history["loss"]))
    for f, before in zip(fused, moving):  # the statistics moved, then froze after 20 of 40 steps
        assert not np.allclose(keras.ops.convert_to_numpy(f.batchnorm.moving_mean), before)
        assert float(keras.ops.convert_to_numpy(f.steps)) == 40
    after = [float(keras.ops.convert_to_numpy(q.max_value)) for q in qat.layers if isinstance(q, ActivationQuantizer)]
    assert after != maxima  # the ranges are trained too
    assert _accuracy(qat, x_test, y_test) >= 0.9


def test_bad_calibration_data_is_refused():
    from keras_bn_ext.errors import InputDataError

    model = int8_fixture("dwsep")
    bad = np.zeros((4, 28, 28, 1), "float32")
    bad[1, 3, 3, 0] = np.nan
    with pytest.raises(InputDataError, match="NaN"):
        quantize_model(model, calibration=bad)
    with pytest.raises(InputDataError):
        quantize_model(model, calibration=np.zeros((4, 14, 14, 1), "float32"))


@pytest.mark.skipif(not TF, reason="the CLI exports with tf2onnx")
def test_bn_export_onnx_writes_a_qat_model_from_its_ranges(digits, tmp_path, capsys):
    """`bn-export-onnx QAT.keras --eval EVAL.npz`: no calibration, judged against the model's own
    simulation; so is `bn-export-litert` for a twin made for LiteRT; --int8 CALIB with a QAT
    model and no --eval are refused in one line."""
    import json

    from keras_bn_ext.cli import export_litert, export_onnx

    (x_train, _), (x_test, y_test) = digits
    qat = quantize_model(int8_fixture("dwsep"), calibration=x_train[:256])
    qat.save(tmp_path / "dwsep.qat.keras")
    np.savez(tmp_path / "eval.npz", image=x_test[:500], labels=y_test[:500])
    model, eval_npz = str(tmp_path / "dwsep.qat.keras"), str(tmp_path / "eval.npz")
    code = export_onnx.main([model, "--eval", eval_npz, "--json"])
    report = json.loads(capsys.readouterr().out)
    r = report["int8"]
    assert code == 0 and report["passed"] and report["calibration_file"] is None
    assert r["calibration"]["samples"] == 0 and r["calibration"]["method"].startswith("learned")
    assert r["fidelity"]["outputs"][0]["top1_agreement"] >= 0.99 and r["commit"] == "passed"
    assert (tmp_path / "dwsep.qat.int8.onnx").exists()
    quantize_model(int8_fixture("dwsep"), calibration=x_train[:256], target="litert").save(
        tmp_path / "dwsep.litert.qat.keras")
    code = export_litert.main([str(tmp_path / "dwsep.litert.qat.keras"), "--eval", eval_npz, "--json"])
    r = json.loads(capsys.readouterr().out)["int8"]
    assert code == 0 and r["calibration"]["method"].startswith("learned") and r["commit"] == "passed"
    assert r["fidelity"]["outputs"][0]["top1_agreement"] >= 0.99 and r["litert"]["per_channel"]
    assert (tmp_path / "dwsep.litert.qat.int8.tflite").exists()
    np.savez(tmp_path / "calib.npz", image=x_train[:64])
    for tool, argv, says in (
            (export_onnx, [model, "--int8", str(tmp_path / "calib.npz"), "--eval", eval_npz, "-o", "x.onnx"],
             "brings its own ranges"),
            (export_onnx, [model, "-o", str(tmp_path / "f.onnx")], "give --eval EVAL.npz")):
        assert tool.main(argv) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "f.onnx").exists()
