"""bn-recalibrate and bn-fold --recalibrate end to end on real .keras files and real
MNIST digits: outputs, JSON reports, exit codes, bad data."""

import hashlib
import json
import os
import re

import keras
import numpy as np
import pytest

from keras_bn_ext import BatchNormalization
from keras_bn_ext.cli import fold as fold_cli
from keras_bn_ext.cli import recalibrate as cli
from keras_bn_ext.testing import randomize_batchnorms
from tests.helpers import REPO, assert_close


def _digits(n=192):
    with np.load(os.path.join(REPO, "tools", "data", "mnist-10k.npz")) as d:
        return (d["x_train"][:n, :, :, None] / 255.0).astype("float32")


@pytest.fixture
def files(tmp_path):
    from tests.helpers import lenet

    model = lenet(BatchNormalization)
    randomize_batchnorms(model)  # statistics far from the digits' own
    path = tmp_path / "lenet.keras"
    model.save(path)
    data = tmp_path / "digits.npz"
    np.savez(data, input_layer=_digits(), labels=np.zeros(192, "int64"))  # labels are ignored
    return str(path), str(data), tmp_path


def _digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _run(main, argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_writes_the_recalibrated_model_and_reports(files, capsys):
    path, data, tmp = files
    before = _digest(path)
    code, out, err = _run(cli.main, [path, "--data", data, "--json", "--batch-size", "50"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["output"] == str(tmp / "lenet.recalibrated.keras") and report["passed"]
    assert report["statistics_equal"] and report["file_max_rel_err"] <= 1e-6
    rec = report["recalibration"]
    assert rec["mode"] == "exact" and rec["samples"] == 192 and rec["batches"] == 4
    assert rec["bn_recalibrated"] == 4 and rec["levels"] == 4
    assert _digest(path) == before
    assert sorted(p.name for p in tmp.iterdir()) == ["digits.npz", "lenet.keras", "lenet.recalibrated.keras"]
    # Oracle: the first BN's statistics are those of the first conv's outputs, numpy float64.
    written = keras.saving.load_model(report["output"])
    conv = written.layers[0]
    h = np.asarray(keras.ops.convert_to_numpy(conv(_digits())), np.float64)
    bn = written.layers[1]
    assert_close(bn.moving_mean, h.mean((0, 1, 2)), what="mean")
    assert_close(bn.moving_variance, h.var((0, 1, 2)), what="variance")


def test_table_output_running_mode_and_data_key(files, capsys, tmp_path):
    path, _, _ = files
    data = tmp_path / "mnist_like.npz"
    np.savez(data, x_train=_digits(64))
    out_path = str(tmp_path / "r.keras")
    code, out, err = _run(cli.main, [path, "--data", str(data), "--data-key", "x_train", "--mode", "running",
                                     "-o", out_path], capsys)
    assert code == 0, err
    assert "running mode" in out and "4 BN recalibrated on 64 samples" in out and "wrote" in out
    code, _, err = _run(cli.main, [path, "--data", str(data), "-o", out_path], capsys)
    assert code == 2 and "--force" in err


def test_fold_after_recalibration(files, capsys):
    """bn-fold --recalibrate: AdaBN, then the fold, verified against the recalibrated model
    (the folded file computes what bn-recalibrate's file computes)."""
    path, data, tmp = files
    code, out, err = _run(fold_cli.main, [path, "--recalibrate", data, "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["passed"] and report["bn_folded"] == 4
    assert report["recalibration"]["bn_recalibrated"] == 4 and "recalibrate" in report["timings_s"]
    assert _run(cli.main, [path, "--data", data], capsys)[0] == 0
    folded = keras.saving.load_model(report["output"])
    recalibrated = keras.saving.load_model(tmp / "lenet.recalibrated.keras")
    x = _digits(32)
    # A fold reorders float32 arithmetic: 1e-5 of the output's magnitude (folding/options.py).
    assert_close(folded(x), recalibrated(x), what="folded vs recalibrated")
    code, out, err = _run(fold_cli.main, [path, "-o", str(tmp / "plain.keras"), "--json"], capsys)
    assert code == 0 and json.loads(out)["recalibration"] is None


def _bad_data(tmp_path, kind):
    path = tmp_path / f"{kind}.npz"
    x = _digits(8)
    if kind == "missing_input":  # two arrays, neither named after the input: which one is meant?
        np.savez(path, pixels=x, other=x)
    elif kind == "wrong_shape":
        np.savez(path, input_layer=x[:, :20])
    elif kind == "empty":
        np.savez(path, input_layer=x[:0])
    elif kind == "nan":
        x[2, 3, 4, 0] = np.nan
        np.savez(path, input_layer=x)
    elif kind == "wrong_dtype":
        np.savez(path, input_layer=(x * 255).astype("uint8"))
    elif kind == "pickled":
        np.savez(path, input_layer=np.array([{"a": 1}, None], dtype=object))
    elif kind == "not_npz":
        path.write_bytes(b"not a zip at all")
    return str(path)


@pytest.mark.parametrize("kind,needle", [
    ("missing_input", "has no array 'input_layer'"),
    ("wrong_shape", r"expects shape \(None, 28, 28, 1\)"),
    ("empty", "holds no samples"),
    ("nan", "holds 1 NaN or infinite values"),
    ("wrong_dtype", "expects float32"),
    ("pickled", "holds Python objects"),
    ("not_npz", "cannot read data file"),
    ("absent", "no such data file"),
])
@pytest.mark.parametrize("tool", ["bn-recalibrate", "bn-fold"])
def test_bad_data_is_exit_2_one_line_nothing_written(files, capsys, tmp_path, kind, needle, tool):
    path, _, tmp = files
    data = _bad_data(tmp_path, kind) if kind != "absent" else str(tmp_path / "absent.npz")
    listing = sorted(p.name for p in tmp.iterdir())
    if tool == "bn-recalibrate":
        code, out, err = _run(cli.main, [path, "--data", data], capsys)
    else:
        code, out, err = _run(fold_cli.main, [path, "--recalibrate", data], capsys)
    assert code == 2, (out, err)
    assert len(err.strip().splitlines()) == 1 and re.search(needle, err), err
    assert sorted(p.name for p in tmp.iterdir()) == listing


def test_the_data_file_is_never_an_output(files, capsys):
    path, data, _ = files
    code, _, err = _run(cli.main, [path, "--data", data, "-o", data, "--force"], capsys)
    assert code == 2 and "is the input file" in err
