"""Every CLI's --json against docs/report.schema.json: the reports of all five tools (float and
INT8 for each export target) and their error objects. The keys mean the same thing for every
target; the schema is what says so, and a drifted key fails it."""

import json
import os

import numpy as np
import pytest

from keras_bn_ext.cli import export_litert, export_onnx, export_openvino, fold, recalibrate
from tests.helpers import REPO, copy_int8_fixture, mnist_digits

jsonschema = pytest.importorskip("jsonschema")
with open(os.path.join(REPO, "docs", "report.schema.json")) as f:
    SCHEMA = json.load(f)
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
EXPORTS = {"onnx": export_onnx, "litert": export_litert, "openvino": export_openvino}


def _errors(report) -> list[str]:
    return [f"{list(e.absolute_path)}: {e.message[:200]}" for e in VALIDATOR.iter_errors(report)]


def _json(cli, argv, capsys):
    code = cli.main(argv)
    out = capsys.readouterr().out
    return code, json.loads(out)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("schema")
    model = copy_int8_fixture(tmp)
    (x_train, y_train), (x_test, y_test) = mnist_digits()
    np.savez(tmp / "mnist.npz", x_train=x_train[:192], y_train=y_train[:192], x_test=x_test[:256],
             y_test=y_test[:256])  # Keras's mnist.npz layout: every data flag takes it
    return tmp, str(model), str(tmp / "mnist.npz")


def test_the_schema_is_a_valid_json_schema():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_fold_and_recalibrate_reports(files, capsys):
    tmp, model, data = files
    code, report = _json(fold, [model, "--json", "-o", str(tmp / "f.keras")], capsys)
    assert code == 0 and not _errors(report)
    code, report = _json(recalibrate, [model, "--data", data, "--json", "-o", str(tmp / "r.keras")], capsys)
    assert code == 0 and not _errors(report)


@pytest.mark.parametrize("target", sorted(EXPORTS))
def test_float_and_int8_reports_of_every_target(files, capsys, target):
    if target == "openvino":
        pytest.importorskip("openvino")
    tmp, model, data = files
    suffix = {"onnx": ".onnx", "litert": ".tflite", "openvino": ".xml"}[target]
    code, report = _json(EXPORTS[target], [model, "--json", "-o", str(tmp / f"m{suffix}")], capsys)
    assert code == 0 and not _errors(report) and report["target"] == target
    code, report = _json(EXPORTS[target], [model, "--json", "--int8", data, "--eval", data,
                                           "-o", str(tmp / f"m.int8{suffix}")], capsys)
    assert code == 0 and not _errors(report) and report["int8"]["target"] == target


def test_a_drifted_key_fails_the_schema(files, capsys):
    tmp, model, _ = files
    _, report = _json(export_onnx, [model, "--json", "-o", str(tmp / "drift.onnx")], capsys)
    assert not _errors(report)
    report["onnxruntime_version"] = report.pop("runtime_version")  # the drift issue 27 found
    assert _errors(report)
    best = jsonschema.exceptions.best_match(VALIDATOR.iter_errors(report))
    assert "runtime_version" in best.message, best.message


@pytest.mark.parametrize("cli,argv", [
    (fold, ["missing.keras", "--json"]),
    (export_onnx, ["MODEL", "--json", "--samples", "0"]),  # a usage error
    (export_litert, ["MODEL", "--json", "--exclude", "no_such_bn", "-o", "OUT/x.tflite"]),
    (recalibrate, ["MODEL", "--json", "--data", "absent.npz"]),
])
def test_error_objects(files, capsys, cli, argv):
    tmp, model, _ = files
    argv = [a.replace("MODEL", model).replace("OUT", str(tmp)) for a in argv]
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse's usage error
        code = exit_.code
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[0])
    assert code == 2 and "error" in report and not _errors(report), out
