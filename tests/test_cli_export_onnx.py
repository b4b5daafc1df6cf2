"""bn-export-onnx end to end: files, JSON report, exit codes, usage errors."""

import hashlib
import json
import os

import keras
import numpy as np
import onnx
import pytest

from keras_bn_ext import BatchNormalization
from keras_bn_ext.cli import export_onnx as cli
from keras_bn_ext.testing import randomize_batchnorms
from tests.helpers import two_input_dict_model

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="tf2onnx needs TensorFlow")


@pytest.fixture
def lenet_path(tmp_path):
    from tests.helpers import lenet

    model = lenet(BatchNormalization)
    randomize_batchnorms(model)
    model.save(tmp_path / "lenet.keras")
    return str(tmp_path / "lenet.keras")


def _run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_json_report(lenet_path, capsys, tmp_path):
    code, out, err = _run([lenet_path, "--json", "--provider", "cpu", "--samples", "1"], capsys)
    assert code == 0, err
    r = json.loads(out)
    for key in ("input", "target", "output", "bn_folded", "runtime", "runtime_version", "device", "inputs",
                "output_names", "outputs", "op_counts", "passed", "onnx"):
        assert key in r
    assert {"opset", "provider", "fallback_reason", "placement", "guards"} <= set(r["onnx"])
    assert r["output"] == str(tmp_path / "lenet.onnx") and os.path.exists(r["output"])
    assert r["onnx"]["opset"] == 17 and r["bn_folded"] == 4 and r["passed"] and r["target"] == "onnx"
    assert r["onnx"]["provider"] == "CPUExecutionProvider" and r["onnx"]["fallback_reason"] is None
    assert r["device"] == "CPUExecutionProvider" and r["runtime"] == "onnxruntime" and r["output_names"] == ["dense_2"]
    assert r["inputs"] == [{"name": "input_layer", "shape": ["batch", 28, 28, 1]}]
    assert set(r["outputs"][0]) >= {"name", "max_abs_err", "max_rel_err", "mean_abs_err", "passed"}
    assert onnx.load(r["output"]).opset_import[0].version == 17


def test_table_benchmark_no_fold_and_opset(lenet_path, capsys, tmp_path):
    out_path = str(tmp_path / "nf.onnx")
    code, out, err = _run([lenet_path, "-o", out_path, "--no-fold", "--opset", "13", "--benchmark",
                           "--samples", "1"], capsys)
    assert code == 0, err
    assert "onnxruntime" in out and "median latency" in out and "passed" in out
    assert onnx.load(out_path).opset_import[0].version == 13


def test_inputs_npz_and_batch_size(lenet_path, capsys, tmp_path):
    x = np.random.default_rng(0).uniform(0, 1, (4, 28, 28, 1)).astype("float32")
    np.savez(tmp_path / "data.npz", input_layer=x)
    code, out, err = _run([lenet_path, "--inputs", str(tmp_path / "data.npz"), "--json", "--provider", "cpu"], capsys)
    assert code == 0, err
    assert json.loads(out)["batch_sizes"] == [4]
    code, out, err = _run([lenet_path, "--batch-size", "1", "--json", "--force", "--provider", "cpu"], capsys)
    assert code == 0, err
    assert json.loads(out)["inputs"][0]["shape"][0] == 1


def test_multi_input_dict_output(tmp_path, capsys):
    model = two_input_dict_model()
    model.save(tmp_path / "multi.keras")
    code, out, err = _run([str(tmp_path / "multi.keras"), "--json", "--provider", "cpu"], capsys)
    assert code == 0, err
    r = json.loads(out)
    assert [i["name"] for i in r["inputs"]] == ["image", "meta"]
    assert [o["name"] for o in r["outputs"]] == ["class_logits", "score"]


def test_verification_failure_keeps_file_and_exits_1(lenet_path, capsys, tmp_path):
    # float16 arithmetic held to float32 rules: it misses the tolerance and, against the
    # model in float64, errs far more than float32 rounding does.
    code, out, _ = _run([lenet_path, "--fp16", "--atol", "0", "--rtol", "0", "--json", "--provider", "cpu"],
                        capsys)
    report = json.loads(out)
    assert code == 1 and report["passed"] is False and report["exact_arithmetic"]["passed"] is False
    assert (tmp_path / "lenet.onnx").exists()


def test_zero_tolerance_float32_export_is_decided_against_float64(lenet_path, capsys):
    code, out, _ = _run([lenet_path, "--atol", "0", "--rtol", "0", "--json", "--provider", "cpu"], capsys)
    report = json.loads(out)
    assert code == 0 and report["exact_arithmetic"]["passed"] and report["onnx"]["diagnosis"] is None


def _listing(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir())


@pytest.mark.parametrize("argv,needle", [
    (["--opset", "12"], "invalid choice"),
    (["--opset", "19"], "invalid choice"),
    (["--provider", "tpu"], "invalid choice"),
    (["--samples", "0"], "at least 1"),
])
def test_argparse_usage_errors(lenet_path, argv, needle, capsys, tmp_path):
    listing = _listing(tmp_path)
    with pytest.raises(SystemExit) as exc:
        cli.main([lenet_path] + argv)
    assert exc.value.code == 2 and needle in capsys.readouterr().err
    assert _listing(tmp_path) == listing


def test_usage_errors_exit_2_nothing_written(lenet_path, capsys, tmp_path):
    before = _digest(lenet_path)
    listing = _listing(tmp_path)
    np.savez(tmp_path / "bad_shape.npz", input_layer=np.zeros((2, 28, 28), "float32"))
    np.savez(tmp_path / "bad_name.npz", pixels=np.zeros((2, 28, 28, 1), "float32"), other=np.zeros(2))
    listing = _listing(tmp_path)
    cases = [
        ([str(tmp_path / "missing.keras")], "no such file"),
        ([lenet_path, "-o", lenet_path], "is the input"),
        ([lenet_path, "-o", str(tmp_path / "nodir" / "m.onnx")], "does not exist"),
        ([lenet_path, "--inputs", str(tmp_path / "bad_shape.npz")],
         "input 'input_layer': the model expects shape (None, 28, 28, 1)"),
        ([lenet_path, "--inputs", str(tmp_path / "bad_name.npz")], "no array 'input_layer'"),
    ]
    for argv, needle in cases:
        code, out, err = _run(argv, capsys)
        assert code == 2, (argv, err)
        assert needle in err and err.count("\n") == 1, err
        assert _listing(tmp_path) == listing
    (tmp_path / "lenet.onnx").write_text("old")
    code, _, err = _run([lenet_path], capsys)
    assert code == 2 and "--force" in err
    assert (tmp_path / "lenet.onnx").read_text() == "old"
    assert _digest(lenet_path) == before


@pytest.mark.parametrize("flag", ["--require-gpu", "--require-all-gpu"])
def test_require_gpu_without_gpu(flag, lenet_path, capsys, tmp_path):
    code, out, err = _run([lenet_path, flag, "--json", "--samples", "1"], capsys)
    if code == 0:
        report = json.loads(out)
        assert report["onnx"]["provider"] == "CUDAExecutionProvider"
        assert flag != "--require-all-gpu" or report["onnx"]["placement"]["cpu_compute_nodes"] == 0
    else:
        # The reason stays onnxruntime's own, in one line (verbose session logging included).
        assert code == 2 and "a GPU run was required" in err and err.count("\n") == 1
        assert "CUDA could not be used: " in err
        assert _listing(tmp_path) == ["lenet.keras"]


def test_fp16_uses_fp16_tolerances_and_says_so(lenet_path, capsys):
    code, out, err = _run([lenet_path, "--fp16", "--json", "--provider", "cpu", "--samples", "1"], capsys)
    assert code == 0, err
    r = json.loads(out)
    assert r["precision"].startswith("float16") and (r["atol"], r["rtol"]) == (1e-3, 1e-2)
    code, out, _ = _run([lenet_path, "--fp16", "--json", "--provider", "cpu", "--samples", "1",
                         "--force", "--rtol", "1e-6", "--atol", "0"], capsys)
    assert code == 1 and json.loads(out)["rtol"] == 1e-6
