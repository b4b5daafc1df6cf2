"""bn-export-onnx --int8 end to end on a trained .keras fixture and real digits: the JSON
report, exit 1 (file kept) when a criterion is missed, and bad data refused in one line
with nothing written."""

import json
import os

import numpy as np
import pytest

from keras_bn_ext.cli import export_onnx as cli
from tests.helpers import copy_int8_fixture, mnist_digits


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("int8")
    model = copy_int8_fixture(tmp)
    (x_train, y_train), (x_test, y_test) = mnist_digits()
    np.savez(tmp / "calib.npz", image=x_train[:256])
    np.savez(tmp / "eval.npz", image=x_test[:1000], labels=y_test[:1000])
    return tmp, str(model)


def test_json_report(files, capsys):
    tmp, model = files
    out = tmp / "out.int8.onnx"
    code = cli.main([model, "--int8", str(tmp / "calib.npz"), "--eval", str(tmp / "eval.npz"), "-o", str(out),
                     "--json", "--force", "--benchmark"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["passed"] and out.exists()
    r = report["int8"]
    q = r["onnx"]  # what only the QDQ graph has
    assert r["target"] == "onnx" and q["format"] == "QDQ" and q["per_channel"] and r["calibration"]["samples"] == 256
    assert r["calibration"]["method"] == "Percentile" and r["evaluation"]["labels"]
    assert q["reduce_range"] == q["target_cpu"]["reduce_range"] and q["target_cpu"]["reason"]
    o = r["fidelity"]["outputs"][0]
    assert o["accuracy_drop_pt"] <= 0.5 and o["top1_agreement"] >= 0.98 and o["sqnr_db"] > 20
    assert r["size_bytes"]["int8"] < r["size_bytes"]["float"]
    # Always timed side by side on the runtime that verifies it; the report says when INT8 does not pay.
    assert set(r["latency_ms"]) == {"batch", "float", "int8", "ratio", "int8_slower", "device", "costly_nodes"}
    assert r["latency_ms"]["int8_slower"] == (r["latency_ms"]["int8"] > r["latency_ms"]["float"])
    assert r["bn_folded"] == r["bn_total"] == 4
    assert r["commit"] == "passed"  # the verify-and-commit stage's code


def test_the_table_names_each_fallback_step(files, capsys, monkeypatch):
    """Per-tensor weights with --equalize auto make the file with and without equalization."""
    monkeypatch.setenv("COLUMNS", "300")
    tmp, model = files
    out = tmp / "per_tensor.onnx"
    code = cli.main([model, "--int8", str(tmp / "calib.npz"), "--eval", str(tmp / "eval.npz"), "-o", str(out),
                     "--per-tensor"])
    text = capsys.readouterr().out
    assert code == 0 and out.exists(), text
    assert "fallback: tried without equalization" in text and "INT8 vs the float Keras model (1000 samples)" in text
    assert "per-tensor weights" in text and f"wrote {out}" in text


def test_missed_criterion_is_exit_1_and_the_file_is_kept(files, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # rich wraps at the terminal's width
    tmp, model = files
    out = tmp / "strict.onnx"
    code = cli.main([model, "--int8", str(tmp / "calib.npz"), "--eval", str(tmp / "eval.npz"), "-o", str(out),
                     "--min-top1-agreement", "1.0", "--max-accuracy-drop", "0", "--min-sqnr-db", "200",
                     "--fallback-budget", "1", "--target-cpu", "vnni"])
    text = capsys.readouterr().out
    assert code == 1 and out.exists()
    assert "kept for inspection" in text and "target CPU vnni (given)" in text
    from keras_bn_ext.export.onnx.cpu import detect_cpu
    if detect_cpu().name != "vnni":
        assert "not on the vnni target" in text


def _bad(tmp, name, **arrays):
    path = tmp / name
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize("case", ["missing", "shape", "dtype", "empty", "nan", "labels_length", "labels_float",
                                  "pickled", "absent", "not_npz"])
def test_bad_data_is_one_line_and_nothing_written(files, capsys, case):
    tmp, model = files
    x = mnist_digits()[0][0][:64]
    calib, evaluation = str(tmp / "calib.npz"), None
    if case == "missing":
        calib = _bad(tmp, "c.npz", pixels=x, other=x)  # two arrays, neither named after the input
    elif case == "shape":
        calib = _bad(tmp, "c.npz", image=x[:, :20])
    elif case == "dtype":
        calib = _bad(tmp, "c.npz", image=(x * 255).astype("int32"))
    elif case == "empty":
        calib = _bad(tmp, "c.npz", image=x[:0])
    elif case == "nan":
        bad = x.copy()
        bad[3, 4, 5, 0] = np.nan
        calib = _bad(tmp, "c.npz", image=bad)
    elif case == "labels_length":
        evaluation = _bad(tmp, "e.npz", image=x, labels=np.zeros(10, "int64"))
    elif case == "labels_float":
        evaluation = _bad(tmp, "e.npz", image=x, labels=np.full(64, 0.5))
    elif case == "pickled":
        calib = str(tmp / "c.npz")
        np.savez(calib, image=np.array([x, "x"], dtype=object))
    elif case == "absent":
        calib = str(tmp / "nothing.npz")
    elif case == "not_npz":
        calib = str(tmp / "c.npz")
        open(calib, "w").write("not an archive")
    out = tmp / f"{case}.onnx"
    argv = [model, "--int8", calib, "-o", str(out)] + (["--eval", evaluation] if evaluation else [])
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("bn-export-onnx: error: "), err
    assert "unexpected" not in err[0]
    assert not out.exists() and not [p for p in os.listdir(tmp) if p.startswith(f".{case}.onnx")]


@pytest.mark.parametrize("flags", [["--fp16"], ["--no-fold"], ["--require-gpu"]])
def test_int8_refuses_float_only_flags(files, capsys, flags):
    tmp, model = files
    with pytest.raises(SystemExit) as exc:
        cli.main([model, "--int8", str(tmp / "calib.npz"), *flags])
    assert exc.value.code == 2 and "--int8 cannot be combined" in capsys.readouterr().err


def test_eval_without_int8_is_refused_for_a_float_model(files, capsys):
    """--eval alone is a QAT model's export; a float model needs --int8 (one line, exit 2, nothing written)."""
    tmp, model = files
    code = cli.main([model, "--eval", str(tmp / "eval.npz"), "-o", str(tmp / "nothing.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "give --int8 CALIB.npz" in err and len(err.strip().splitlines()) == 1
    assert not (tmp / "nothing.onnx").exists()
