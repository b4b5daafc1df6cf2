"""bn-fold end to end on real .keras files: output, JSON report, exit codes, bad input."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile

import keras
import pytest
from keras import layers

from keras_bn_ext import BatchNormalization
from keras_bn_ext.cli import fold as cli
from keras_bn_ext.testing import randomize_batchnorms


def _save(model, path):
    model.save(path)
    return str(path)


@pytest.fixture
def lenet_path(tmp_path):
    from tests.helpers import lenet

    model = lenet(BatchNormalization)
    randomize_batchnorms(model)
    return _save(model, tmp_path / "lenet.keras")


def _digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_fold_writes_default_output_and_reports(lenet_path, capsys, tmp_path):
    before = _digest(lenet_path)
    code, out, err = _run([lenet_path, "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    for key in ("input", "output", "bn_total", "bn_folded", "folded", "kept", "max_abs_err", "max_rel_err", "passed"):
        assert key in report
    assert report["bn_total"] == 4 and report["bn_folded"] == 4 and report["passed"]
    assert report["folded"][0] == {"bn": "batch_normalization", "into": "conv2d", "direction": "backward"}
    assert report["output"] == str(tmp_path / "lenet.folded.keras")
    assert _digest(lenet_path) == before
    folded = keras.saving.load_model(report["output"])
    assert not any(isinstance(l, BatchNormalization) for l in folded.layers)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_table_output_and_force(lenet_path, capsys, tmp_path):
    out_path = str(tmp_path / "x.keras")
    code, out, _ = _run([lenet_path, "-o", out_path], capsys)
    assert code == 0 and "folded" in out and "passed" in out and os.path.exists(out_path)
    code, _, err = _run([lenet_path, "-o", out_path], capsys)
    assert code == 2 and "--force" in err
    code, _, _ = _run([lenet_path, "-o", out_path, "--force"], capsys)
    assert code == 0


def test_nothing_to_fold_still_writes_the_model(tmp_path, capsys):
    # `bn-fold m.keras -o f.keras && bn-export-onnx f.keras` must work on every model.
    inputs = keras.Input((4,))
    path = _save(keras.Model(inputs, layers.Dense(2, activation="relu")(inputs)), tmp_path / "plain.keras")
    code, out, err = _run([path], capsys)
    assert code == 0 and "nothing to fold" in out
    assert "holds no BatchNormalization layer" in err  # said right after loading
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.folded.keras", "plain.keras"]
    code, out, _ = _run([path, "-o", str(tmp_path / "again.keras"), "--json"], capsys)
    report = json.loads(out)
    assert code == 0 and report["bn_total"] == 0 and report["output"] == str(tmp_path / "again.keras")
    assert keras.saving.load_model(report["output"]).count_params() == 10


def test_exclude_keeps_the_named_bn(lenet_path, capsys):
    code, out, _ = _run([lenet_path, "--json", "--exclude", "batch_normalization_1", "--force"], capsys)
    report = json.loads(out)
    assert code == 0 and report["bn_folded"] == 3
    assert report["kept"] == [{"bn": "batch_normalization_1", "code": "excluded", "reason": "excluded by the caller"}]


def test_exclude_with_an_unknown_name_is_exit_2_naming_the_bns(lenet_path, capsys, tmp_path):
    out_path = tmp_path / "x.keras"
    code, out, err = _run([lenet_path, "-o", str(out_path), "--exclude", "bn_3", "--json"], capsys)
    assert code == 2 and "'bn_3'" in err and "batch_normalization_3" in err
    assert json.loads(out)["error"]["code"] == "unknown_layer" and not out_path.exists()


def test_a_saved_model_that_does_not_reload_is_not_written(lenet_path, tmp_path, monkeypatch):
    # What is written is what was verified. Fault injection: Keras's loader fails on the
    # saved file as it did on a KerasHub DeepLabV3Backbone.
    from keras_bn_ext.folding.save import fold_to_file
    from keras_bn_ext.model_io import load_model

    def broken_load(*args, **kwargs):
        raise ValueError("Functional could not be deserialized properly")

    model = load_model(lenet_path)
    monkeypatch.setattr(keras.saving, "load_model", broken_load)
    out_path = tmp_path / "f.keras"
    result = fold_to_file(model, out_path)
    assert not result.passed and "does not load back" in result.reload_error
    assert result.output is None and not out_path.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_wrong_fold_fails_both_checks_and_exits_1(lenet_path, capsys, tmp_path, monkeypatch):
    # Fault injection: a fold that forgets the shift. The float32 comparison fails, and
    # so does the float64 one (a wrong weight errs far beyond float32 rounding).
    from keras_bn_ext.folding import rules

    right = rules.fold_backward
    monkeypatch.setattr(rules, "fold_backward",
                        lambda layer, scale, shift, weights=None: right(layer, scale, 0 * shift, weights))
    code, out, _ = _run([lenet_path, "--json"], capsys)
    report = json.loads(out)
    assert code == 1 and report["passed"] is False and report["exact_arithmetic"]["passed"] is False
    assert not (tmp_path / "lenet.folded.keras").exists()


def test_zero_tolerance_is_decided_against_float64(lenet_path, capsys):
    # float32 vs float32 cannot meet atol = rtol = 0; the fold is then judged against the
    # original run in float64: the folded model is as close to it as the original.
    code, out, _ = _run([lenet_path, "--atol", "0", "--rtol", "0", "--json", "--force"], capsys)
    report = json.loads(out)
    assert report["verification"]["passed"] is False and report["exact_arithmetic"]["passed"] is True
    assert code == 0 and report["exact_arithmetic"]["candidate_max_rel_err"] < 1e-5


# --- bad input: exit 2, one line on stderr, nothing written, input untouched ---------

def _bad_file(tmp_path, kind, lenet_path):
    if kind == "missing":
        return str(tmp_path / "nope.keras")
    if kind == "directory":
        (tmp_path / "dir.keras").mkdir()
        return str(tmp_path / "dir.keras")
    if kind == "not_zip":
        (tmp_path / "text.keras").write_text("hello")
        return str(tmp_path / "text.keras")
    if kind == "truncated":
        data = open(lenet_path, "rb").read()
        (tmp_path / "cut.keras").write_bytes(data[: len(data) // 2])
        return str(tmp_path / "cut.keras")
    if kind == "broken_config":
        target = tmp_path / "broken.keras"
        with zipfile.ZipFile(lenet_path) as src, zipfile.ZipFile(target, "w") as dst:
            for item in src.infolist():
                data = src.read(item.filename)
                if item.filename == "config.json":
                    data = data[: len(data) // 2]
                dst.writestr(item, data)
        return str(target)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind,needle", [
    ("missing", "no such file"),
    ("directory", "is a directory"),
    ("not_zip", "not a zip"),
    ("truncated", "truncated"),
    ("broken_config", "broken config.json"),
])
def test_bad_files(kind, needle, tmp_path, capsys, lenet_path):
    path = _bad_file(tmp_path, kind, lenet_path)
    listing = sorted(os.listdir(tmp_path))
    code, out, err = _run([path], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and needle in err, err
    assert sorted(os.listdir(tmp_path)) == listing


def test_output_rules(lenet_path, tmp_path, capsys):
    before = _digest(lenet_path)
    code, _, err = _run([lenet_path, "-o", lenet_path, "--force"], capsys)
    assert code == 2 and "is the input" in err
    code, _, err = _run([lenet_path, "-o", str(tmp_path / "no" / "dir" / "x.keras")], capsys)
    assert code == 2 and "does not exist" in err
    assert _digest(lenet_path) == before


CUSTOM_MODULE = '''
import keras

@keras.saving.register_keras_serializable(package="testpkg")
class Doubler(keras.layers.Layer):
    def call(self, x):
        return x * 2.0
'''


def test_unregistered_custom_layer_then_custom_module(tmp_path, capsys):
    module = tmp_path / "mylayers.py"
    module.write_text(CUSTOM_MODULE)
    script = f"""
import sys; sys.path.insert(0, {str(tmp_path)!r})
import keras, mylayers
from keras_bn_ext import BatchNormalization
i = keras.Input((4,))
h = BatchNormalization()(keras.layers.Dense(3)(i))
keras.Model(i, mylayers.Doubler()(h)).save({str(tmp_path / 'custom.keras')!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    path = str(tmp_path / "custom.keras")
    code, _, err = _run([path], capsys)
    assert code == 2 and "Doubler" in err and "--custom-module" in err
    code, out, err = _run([path, "--custom-module", str(module), "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["bn_folded"] == 1


def test_lambda_needs_unsafe(tmp_path, capsys):
    i = keras.Input((4,))
    h = BatchNormalization()(layers.Dense(3)(i))
    path = _save(keras.Model(i, layers.Lambda(lambda x: x * 2.0)(h)), tmp_path / "lam.keras")
    code, _, err = _run([path], capsys)
    assert code == 2 and "--unsafe" in err and err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["lam.keras"]
    code, out, err = _run([path, "--unsafe", "--json"], capsys)
    assert code == 0 and json.loads(out)["bn_folded"] == 1


@pytest.mark.parametrize("bad", [-0.5, float("nan")])
def test_invalid_variance_exit_2(tmp_path, capsys, bad):
    i = keras.Input((4,))
    bn = BatchNormalization()
    model = keras.Model(i, layers.ReLU()(bn(layers.Dense(3)(i))))
    w = bn.get_weights()
    w[3][0] = bad
    bn.set_weights(w)
    path = _save(model, tmp_path / "badvar.keras")
    code, _, err = _run([path], capsys)
    assert code == 2 and "negative or non-finite" in err
    assert sorted(os.listdir(tmp_path)) == ["badvar.keras"]


def test_usage_errors_exit_2(lenet_path):
    with pytest.raises(SystemExit) as exc:
        cli.main([lenet_path, "--samples", "0"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2


def test_console_script_prints_one_clean_line(tmp_path):
    """The installed bn-fold: TensorFlow's import-time log lines stay off stderr."""
    exe = shutil.which("bn-fold", path=os.path.dirname(sys.executable)) or shutil.which("bn-fold")
    if exe is None:
        pytest.skip("bn-fold is not installed as a console script")
    result = subprocess.run([exe, str(tmp_path / "missing.keras")], capture_output=True, text=True,
                            env={k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"})
    assert result.returncode == 2
    assert result.stderr == f"bn-fold: error: no such file: {tmp_path / 'missing.keras'}\n"
    help_text = subprocess.run([exe, "--help"], capture_output=True, text=True).stdout
    for flag in ("--force", "--json", "--samples", "--atol", "--rtol", "--custom-module", "--unsafe", "-o"):
        assert flag in help_text


def test_output_that_links_to_the_input(lenet_path, tmp_path, capsys):
    link = tmp_path / "link.keras"
    link.symlink_to(lenet_path)
    before = _digest(lenet_path)
    code, _, err = _run([lenet_path, "-o", str(link), "--force"], capsys)
    assert code == 2 and "is the input" in err
    assert _digest(lenet_path) == before


def test_missing_input_is_reported_before_output_checks(tmp_path, capsys):
    (tmp_path / "gone.folded.keras").write_text("x")
    code, _, err = _run([str(tmp_path / "gone.keras")], capsys)
    assert code == 2 and "no such file" in err


def test_legacy_h5_input_folds_to_keras(tmp_path, capsys):
    from tests.helpers import lenet

    model = lenet(BatchNormalization)
    randomize_batchnorms(model)
    h5 = tmp_path / "lenet.h5"
    model.save(h5)  # Keras's legacy H5 format, as Keras 2 / tf.keras users have it
    code, out, err = _run([str(h5), "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["output"] == str(tmp_path / "lenet.folded.keras") and report["bn_folded"] == 4


@pytest.mark.parametrize("kind", ["weights_only", "truncated"])
def test_unusable_h5_exit_2(kind, tmp_path, capsys, lenet_path):
    model = keras.saving.load_model(lenet_path)
    h5 = tmp_path / "bad.h5"
    if kind == "weights_only":
        model.save_weights(tmp_path / "w.weights.h5")
        os.rename(tmp_path / "w.weights.h5", h5)
    else:
        model.save(tmp_path / "full.h5")
        data = (tmp_path / "full.h5").read_bytes()
        h5.write_bytes(data[: len(data) // 2])
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = _run([str(h5)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert ("only weights" if kind == "weights_only" else "damaged or truncated") in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("argv, code_name", [(["nope.keras"], "model_load"), (["{model}", "-o", "{model}"], "output_path")])
def test_json_refusals_print_one_error_object(argv, code_name, tmp_path, capsys, lenet_path):
    # Scripts read stdout: a refusal under --json is one JSON object there too, exit 2.
    argv = [a.format(model=lenet_path) if "{" in a else (str(tmp_path / a) if a.endswith(".keras") else a)
            for a in argv]
    code, out, err = _run(argv + ["--json"], capsys)
    error = json.loads(out)["error"]
    assert code == 2 and error["code"] == code_name and error["message"] in err
    assert set(error) == {"code", "message", "layer", "op"}
