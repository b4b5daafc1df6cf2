"""OpenVINO, the third target, added as a registered unit (`export/openvino/`): converted with
openvino.convert_model, saved as IR (.xml + .bin together), run on OpenVINO's CPU runtime in
float32, outputs against the Keras model (the oracle) to float32 tolerances, through the one
float driver and the stage every target shares."""

import json

import keras
import numpy as np
import pytest

pytest.importorskip("openvino")

from keras_bn_ext.cli import export_openvino as cli  # noqa: E402
from keras_bn_ext.export.driver import export_verified  # noqa: E402
from keras_bn_ext.export.options import ExportOptions  # noqa: E402
from keras_bn_ext.export.target import get_target  # noqa: E402
from tests.helpers import copy_int8_fixture, int8_fixture, mnist_digits, two_input_dict_model  # noqa: E402


def test_trained_net_on_real_digits(tmp_path):
    model = int8_fixture("dwsep")
    (_, _), (x, y) = mnist_digits()
    path = tmp_path / "m.xml"
    result = export_verified(model, path, target="openvino", options=ExportOptions(inputs=[x[:256]]))
    # Same float32 operations in another order: 1e-5 of the output (every target's tolerance).
    assert result.passed and result.verification.comparison.max_rel_err <= 1e-5
    assert result.export.bn_folded == 9 and "GroupConvolution" in result.export.op_counts
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin", "m.xml"]  # both, and nothing else
    got = get_target("openvino").run(path, [{"image": x[:500]}], keras_names=["dense_3"]).outputs[0][0]
    want = keras.ops.convert_to_numpy(model(x[:500], training=False))
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))
    assert np.mean(np.argmax(got, 1) == y[:500]) > 0.9


def test_two_inputs_and_dict_outputs_keep_keras_names_and_a_dynamic_batch(tmp_path):
    result = export_verified(two_input_dict_model(), tmp_path / "m.xml", target="openvino")
    assert result.passed and result.verification.batch_sizes == [1, 8]
    assert [i["name"] for i in result.export.inputs] == ["image", "meta"]
    assert sorted(result.export.output_names) == ["class_logits", "score"]
    assert all(i["shape"][0] is None for i in result.export.inputs)


def test_a_changed_weight_fails_and_the_file_is_kept_for_inspection(tmp_path, monkeypatch):
    # Fault injection: the converter writes a graph with one kernel 1% off. The check must see it.
    from keras_bn_ext.export.openvino import convert as ov_convert

    real = ov_convert.to_openvino_model

    def off_by_one_percent(model):
        wrong = keras.models.clone_model(model)
        weights = model.get_weights()
        wrong.set_weights([weights[0] * 1.01] + weights[1:])
        return real(wrong)

    monkeypatch.setattr(ov_convert, "to_openvino_model", off_by_one_percent)
    result = export_verified(int8_fixture("lenet_bn"), tmp_path / "m.xml", target="openvino")
    assert not result.passed and result.stage.code == "kept_failed"
    assert result.verification.comparison.max_rel_err > 1e-3
    assert result.verification.exact is not None and not result.verification.exact.passed


def test_cli_json_has_the_shared_keys_and_errors_are_one_line(tmp_path, capsys):
    src = copy_int8_fixture(tmp_path)
    assert cli.main([str(src), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["target"] == "openvino" and report["runtime"] == "openvino" and report["passed"]
    assert report["output"] == str(tmp_path / "lenet.xml") and report["output_names"] == ["dense_2"]
    assert report["openvino"] == {"weights_file": str(tmp_path / "lenet.bin"), "inference_precision": "f32"}
    assert report["device"] == "CPU (f32)" and report["runtime_version"].startswith("20")
    assert cli.main([str(src)]) == 2 and "--force" in capsys.readouterr().err
    assert cli.main([str(src), "--force", "--exclude", "nope", "--json"]) == 2
    out, err = capsys.readouterr()
    assert json.loads(out)["error"]["code"] == "unknown_layer" and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        cli.main([str(src), "-o", str(tmp_path / "x.onnx")])
    assert "must be an .xml file" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["lenet_bn", "dwsep"])
def test_int8_on_trained_nets_within_half_a_point_of_float(tmp_path, capsys, name):
    # Trained fixtures, real digits: 512 to calibrate on, the 2,000 test digits to judge on.
    (x_train, _), (x_test, y_test) = mnist_digits()
    src = copy_int8_fixture(tmp_path, name)
    np.savez(tmp_path / "mnist.npz", x_train=x_train[:512], y_train=np.zeros(512, "int64"), x_test=x_test,
             y_test=y_test)  # Keras's mnist.npz layout: x_train calibrates, x_test/y_test judge
    data = str(tmp_path / "mnist.npz")
    assert cli.main([str(src), "--int8", data, "--eval", data, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["int8"]
    o = report["fidelity"]["outputs"][0]
    assert report["passed"] and o["accuracy_drop_pt"] <= 0.5, o
    assert report["size_bytes"]["ratio"] < 0.4 and report["latency_ms"]["device"] == "CPU (f32)"
    assert report["target"] == "openvino" and report["openvino"]["qdq"]["format"] == "QDQ"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lenet.int8.bin", "lenet.int8.xml", "lenet.keras",
                                                          "mnist.npz"]


def test_qat_model_is_written_from_its_learned_ranges(tmp_path, capsys):
    """`bn-export-openvino QAT.keras --eval EVAL.npz`: the QAT model's QDQ graph (its learned
    ranges, no calibration) compiled to IR, judged on OpenVINO's CPU runtime against the QAT
    model's own simulation on real digits."""
    from keras_bn_ext.qat import quantize_model

    (x_train, y_train), (x_test, y_test) = mnist_digits()
    qat = quantize_model(int8_fixture("dwsep"), calibration=x_train[:512])
    qat.compile(optimizer=keras.optimizers.Adam(1e-4), loss="sparse_categorical_crossentropy")
    qat.fit(x_train[:1600], y_train[:1600], batch_size=64, epochs=1, verbose=0)
    qat.save(tmp_path / "dwsep.qat.keras")
    np.savez(tmp_path / "eval.npz", image=x_test, labels=y_test)
    code = cli.main([str(tmp_path / "dwsep.qat.keras"), "--eval", str(tmp_path / "eval.npz"), "--json"])
    report = json.loads(capsys.readouterr().out)
    r = report["int8"]
    assert code == 0 and report["passed"] and r["calibration"]["learned"] and r["calibration"]["samples"] == 0
    o = r["fidelity"]["outputs"][0]
    # The file against its own simulation (not float): OpenVINO's int8 kernels round their
    # requantization in their own way, so a few digits at ties may flip.
    assert o["top1_agreement"] >= 0.99 and abs(o["accuracy_quantized"] - o["accuracy_float"]) <= 0.003, o
    assert (tmp_path / "dwsep.qat.int8.xml").exists() and (tmp_path / "dwsep.qat.int8.bin").exists()


def test_four_bit_qat_model_keeps_its_int4_weights(tmp_path, capsys):
    """A W4 twin's int4 QDQ graph (opset 21) compiles to IR: the weights stay 4-bit (the .bin
    under a quarter of the float file's; measured 0.18x) and the file reproduces its
    simulation on real digits (untrained twin, 500 digits: measured 99.6%)."""
    from keras_bn_ext.qat import quantize_model

    (x_train, _), (x_test, y_test) = mnist_digits()
    quantize_model(int8_fixture("dwsep"), calibration=x_train[:256], weight_bits=4).save(tmp_path / "w4.qat.keras")
    np.savez(tmp_path / "eval.npz", image=x_test[:500], labels=y_test[:500])
    code = cli.main([str(tmp_path / "w4.qat.keras"), "--eval", str(tmp_path / "eval.npz"), "--json"])
    r = json.loads(capsys.readouterr().out)["int8"]
    assert code == 0 and r["openvino"]["qdq"]["weight_type"] == "int4" and r["openvino"]["qdq"]["opset"] == 21
    assert r["fidelity"]["outputs"][0]["top1_agreement"] >= 0.99, r["fidelity"]
    assert r["size_bytes"]["ratio"] < 0.25, r["size_bytes"]
