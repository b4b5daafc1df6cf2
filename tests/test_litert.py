"""LiteRT, the second target: converted with TensorFlow's LiteRT converter, run on
ai-edge-litert's interpreter, names as Keras names them, dynamic batch resized, outputs
against the Keras model (the oracle) to float32 tolerances."""

import json
import os

import keras
import numpy as np
import pytest

from keras_bn_ext.cli import export_litert as cli
from keras_bn_ext.export.driver import export_verified
from keras_bn_ext.export.litert.target import LITERT
from keras_bn_ext.export.options import ExportOptions
from keras_bn_ext.testing import randomize_batchnorms
from tests.helpers import copy_int8_fixture, int8_fixture, mnist_digits, two_input_dict_model


def export_litert_verified(model, path, **options):
    return export_verified(model, path, target="litert", options=ExportOptions(**options))


def run_litert(path, batches, *, keras_names):
    return LITERT.run(path, batches, keras_names=keras_names).outputs, None


def test_trained_net_on_real_digits_and_resized_batches(tmp_path):
    model = int8_fixture("dwsep")
    path = tmp_path / "m.tflite"
    result = export_litert_verified(model, path)
    # Same float32 operations in another order: 1e-5 of the output (the ONNX target's tolerance).
    assert result.passed and result.verification.comparison.max_rel_err <= 1e-5
    assert result.verification.batch_sizes == [1, 8] and result.export.bn_folded == 9
    assert "DEPTHWISE_CONV_2D" in result.export.op_counts and not any("BATCH" in op for op in result.export.op_counts)
    (_, _), (x, y) = mnist_digits()
    for n in (1, 3, 500):  # batch 1, and resized twice
        got, _ = run_litert(path, [{"image": x[:n]}], keras_names=["dense_3"])
        want = keras.ops.convert_to_numpy(model(x[:n], training=False))
        assert np.max(np.abs(got[0][0] - want)) <= 1e-5 * np.max(np.abs(want))
    assert np.mean(np.argmax(got[0][0], 1) == y[:500]) > 0.9


def test_two_inputs_and_dict_outputs_keep_keras_names(tmp_path):
    model = two_input_dict_model()
    result = export_litert_verified(model, tmp_path / "m.tflite")
    assert result.passed
    assert [i["name"] for i in result.export.inputs] == ["image", "meta"]
    assert sorted(result.export.output_names) == ["class_logits", "score"]


@pytest.mark.slow
def test_a_model_nobody_here_wrote(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), alpha=0.35)
    randomize_batchnorms(model, residual_gamma=(0.1, 0.3))
    result = export_litert_verified(model, tmp_path / "m.tflite")
    assert result.passed and result.verification.comparison.max_rel_err <= 1e-5
    assert result.export.bn_folded == 52


def test_fp16_weights_are_smaller_and_verified_with_float16_tolerances(tmp_path):
    model = int8_fixture("relu_lenet")
    plain = export_litert_verified(model, tmp_path / "a.tflite")
    half = export_litert_verified(model, tmp_path / "b.tflite", fp16=True)
    assert half.passed and half.export.precision == "float16 weights"
    assert half.verification.comparison.rtol == 1e-2
    assert os.path.getsize(tmp_path / "b.tflite") < 0.6 * os.path.getsize(tmp_path / "a.tflite")
    assert plain.verification.comparison.rtol == 1e-5


def test_cli_json_and_usage_errors(tmp_path, capsys):
    src = copy_int8_fixture(tmp_path)
    assert cli.main([str(src), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["output"] == str(tmp_path / "lenet.tflite") and report["bn_folded"] == 4
    assert report["runtime"] == "ai-edge-litert" and report["target"] == "litert"
    assert report["litert"] == {"signature": "serving_default", "batch_note": None}
    assert cli.main([str(src)]) == 2  # exists, no --force
    assert "exists" in capsys.readouterr().err
    assert cli.main([str(tmp_path / "missing.keras")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bn-export-litert: error:")


@pytest.mark.parametrize("name", ["lenet_bn", "wide_range"])
def test_full_integer_int8_within_half_a_point(tmp_path, name):
    from keras_bn_ext.export.int8 import export_int8

    (x_train, _), (x_test, y_test) = mnist_digits()
    result = export_int8(int8_fixture(name), tmp_path / "m.int8.tflite", [x_train[:512]], target="litert",
                         eval_data=[x_test], labels=y_test)
    o = result.fidelity.outputs[0]
    assert result.passed and o.accuracy_drop_pt <= 0.5, (o.accuracy_float, o.accuracy_quantized)
    assert {"QUANTIZE", "DEQUANTIZE"} <= set(result.op_counts) and result.size.ratio < 0.35
    # The wide-range net needs equalization in INT8 (per-tensor activations): the plain file misses.
    assert (result.equalization is not None) == (name == "wide_range")


def test_cli_int8_bad_data_is_one_line(tmp_path, capsys):
    src = copy_int8_fixture(tmp_path)
    np.savez(tmp_path / "c.npz", pixels=np.zeros((8, 28, 28, 1), "float32"), other=np.zeros(8))
    assert cli.main([str(src), "--int8", str(tmp_path / "c.npz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no array 'image'" in err[0]
    assert not (tmp_path / "lenet.int8.tflite").exists()


def test_recurrent_layers_are_converted_with_the_batch_fixed_to_one(tmp_path):
    """The converter lowers a GRU's tensor lists to builtin ops only with static shapes: the
    dynamic batch gives way to batch 1, the report says so, and verification runs at 1."""
    from keras_bn_ext import BatchNormalization

    inputs = keras.Input((20, 13), name="audio")
    x = keras.layers.GRU(16, return_sequences=True)(inputs)
    x = BatchNormalization(name="bn")(x)
    model = keras.Model(inputs, keras.layers.Dense(4, name="logits")(x))
    randomize_batchnorms(model)
    result = export_litert_verified(model, tmp_path / "gru.tflite")
    assert result.passed and result.export.batch_size == 1 and "static shapes" in result.detail["batch_note"]
    assert result.verification.batch_sizes == [1] and result.export.bn_folded == 1
    assert result.to_dict()["batch_size"] == 1
    assert result.export.inputs == [{"name": "audio", "shape": [1, 20, 13]}]
