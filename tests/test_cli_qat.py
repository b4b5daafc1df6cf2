"""bn-qat end to end on a trained fixture and real digits: the trained QAT model written,
reloaded and checked, its JSON against the schema, the INT8 file from its ranges; bad data
(no labels, wrong shapes, NaN, pickles, labels out of range) refused in one line, exit 2,
nothing written."""

import json
import os

import keras
import numpy as np
import pytest

from keras_bn_ext.cli import export_onnx, qat
from tests.helpers import REPO, copy_int8_fixture, mnist_digits

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="the CLIs run on TensorFlow")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qat")
    model = copy_int8_fixture(tmp, "dwsep", "dwsep.keras")
    (x_train, y_train), (x_test, y_test) = mnist_digits()
    np.savez(tmp / "train.npz", image=x_train[:1024], labels=y_train[:1024])
    np.savez(tmp / "eval.npz", image=x_test[:500], labels=y_test[:500])
    return tmp, str(model)


def _schema_errors(report):
    jsonschema = pytest.importorskip("jsonschema")
    with open(os.path.join(REPO, "docs", "report.schema.json")) as f:
        validator = jsonschema.Draft202012Validator(json.load(f))
    return [f"{list(e.absolute_path)}: {e.message[:200]}" for e in validator.iter_errors(report)]


def test_train_write_reload_then_export(files, capsys):
    tmp, model = files
    out = tmp / "dwsep.qat.keras"
    code = qat.main([model, "--data", str(tmp / "train.npz"), "--eval", str(tmp / "eval.npz"), "-o", str(out),
                     "--json", "--bn-freeze-after", "10"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["passed"] and out.exists(), report
    assert _schema_errors(report) == []
    t = report["training"]
    assert t["steps"] == 16 and t["loss"] == "sparse_categorical_crossentropy" and t["from_logits"] is False
    assert report["file_max_rel_err"] == 0.0  # the reloaded file computes what the trained model computes
    # Untrained, the twin scores what PTQ scores: within 1 pt of float on these 500 digits (5
    # digits; tests/test_qat.py holds it to 0.5 pt on the 2,000 test digits).
    assert abs(t["accuracy_qat_untrained"] - t["accuracy_float"]) <= 0.01
    code = export_onnx.main([str(out), "--eval", str(tmp / "eval.npz"), "--json"])
    int8 = json.loads(capsys.readouterr().out)
    assert code == 0 and int8["passed"] and _schema_errors(int8) == []
    assert int8["int8"]["calibration"]["learned"] and int8["calibration_file"] is None


def test_the_table(files, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    tmp, model = files
    out = tmp / "table.qat.keras"
    assert qat.main([model, "--data", str(tmp / "train.npz"), "-o", str(out), "--per-tensor"]) == 0
    text = capsys.readouterr().out
    assert "weights 8-bit per tensor" in text and "reloaded: outputs vs the trained model" in text
    assert f"wrote {out}" in text


def _bad(tmp):
    (x, y), _ = mnist_digits()
    nan = x[:64].copy()
    nan[3, 4, 4, 0] = np.nan
    np.savez(tmp / "nolabels.npz", image=x[:64])
    np.savez(tmp / "shape.npz", image=x[:64, :14, :14], labels=y[:64])
    np.savez(tmp / "nan.npz", image=nan, labels=y[:64])
    np.savez(tmp / "range.npz", image=x[:64], labels=y[:64] + 10)
    np.savez(tmp / "count.npz", image=x[:64], labels=y[:32])
    np.save(tmp / "obj.npy", np.array([{"a": 1}], dtype=object))
    np.savez(tmp / "pickle.npz", image=np.array([{"a": 1}], dtype=object), labels=y[:1])
    return {"nolabels.npz": "holds no labels", "shape.npz": "shape", "nan.npz": "NaN", "range.npz": "classes",
            "count.npz": "one class id per sample", "pickle.npz": "pickle"}


def test_bad_data_is_one_line_exit_2_and_nothing_written(files, capsys):
    tmp, model = files
    for name, says in _bad(tmp).items():
        out = tmp / f"bad-{name}.keras"
        code = qat.main([model, "--data", str(tmp / name), "-o", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1, (name, err)
        assert says.lower() in err.lower(), (name, err)
        assert not out.exists() and not list(tmp.glob(f"*bad-{name}*"))


def test_usage_errors_are_one_line(files, capsys):
    tmp, model = files
    for argv, says in (([model], "--data"), ([model, "--data", str(tmp / "train.npz"), "--learning-rate", "0"],
                                             "Received: learning_rate=0.0"),
                       ([model, "--data", str(tmp / "train.npz"), "--weight-bits", "3"], "invalid choice"),
                       ([model, "--data", str(tmp / "train.npz"), "--weight-bits", "4", "--target", "litert"],
                        "Received: weight_bits=4, target='litert'")):
        with pytest.raises(SystemExit) as exc:
            qat.main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and says in err and len(err.strip().splitlines()) == 1, err
