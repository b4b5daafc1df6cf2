"""The main job (tools/lenet_mnist.py) end to end on the shipped MNIST sample, offline."""

import json
import os
import subprocess
import sys

import keras
import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="the demo exports with tf2onnx")

SCRIPT = os.path.join(REPO, "tools", "lenet_mnist.py")


def _demo(tmp_path, *args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, SCRIPT, "--out", str(tmp_path), "--quiet", "--repeats", "5", *args],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout, json.loads((tmp_path / "report.json").read_text())


def test_one_epoch_end_to_end_offline(tmp_path):
    out, report = _demo(tmp_path, "--epochs", "1", "--no-download")
    for name in ("lenet_bn.keras", "lenet_bn.folded.keras", "lenet_bn.onnx", "lenet_bn.int8.onnx", "lenet_bn.tflite",
                 "lenet_bn.int8.tflite", "lenet_bn.qat.keras", "lenet_bn.qat.int8.onnx", "history.png", "report.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert "shipped MNIST sample" in report["data"]["source"]
    assert report["data"]["train_images"] == 8000 and report["data"]["test_images"] == 2000
    assert set(report["runs"]) == {"keras_bn_ext", "keras.layers"}
    for run in report["runs"].values():
        assert len(run["history"]["loss"]) == 1 and 0 <= run["test_accuracy"] <= 1
        assert f"{run['test_accuracy']:.4f}" in out  # what is printed is what is reported
    assert len(report["first_bn"]["keras_bn_ext"]["gamma"]) == 6
    assert report["fold"]["bn_folded"] == 4 and report["fold"]["verification"]["passed"]
    recal = report["recalibration"]  # the keras.layers run, its lagging statistics re-estimated
    assert recal["bn_recalibrated"] == 4 and f"{recal['test_accuracy']:.4f}" in out
    assert report["onnx"]["verification"]["passed"]
    assert report["onnx"]["verification"]["provider"] in ("CPUExecutionProvider", "CUDAExecutionProvider")
    int8 = report["int8"]["fidelity"]["outputs"][0]  # one epoch: the criterion still holds
    assert report["int8"]["passed"] and f"{int8['accuracy_quantized']:.4f}" in out
    assert report["litert"]["passed"] and report["litert"]["int8"]["passed"]
    qat = report["qat"]  # one QAT epoch, its INT8 file from the learned ranges against its own simulation
    assert qat["passed"] and qat["int8"]["passed"] and qat["int8"]["calibration"]["learned"]
    assert f"{qat['int8']['fidelity']['outputs'][0]['accuracy_quantized']:.4f}" in out
    assert set(report["latency_ms"]) == {"1", "8"}
    assert set(report["latency_ms"]["8"]) == {"keras_original", "keras_folded", "onnxruntime_cpu"}


def test_download_failure_falls_back_to_sample(capsys):
    """The real loading code runs (keras.datasets.mnist) and, offline, says which data it used.
    Where MNIST can be downloaded or is cached, the full set is used instead. (The loader
    alone, in this process: the whole job's run on that data is the offline test above.)"""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lenet_mnist_tool", SCRIPT)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    ((x_train, y_train), (x_test, y_test)), source = tool.load_mnist(None, download=True)
    out = capsys.readouterr().out
    if "shipped" in source:
        assert "could not be downloaded" in out and "using the shipped" in out
        assert len(x_train) == 8000 and len(x_test) == 2000
    else:
        assert source.startswith("full MNIST") and len(x_train) == 60000
    assert x_train.shape[1:] == (28, 28) and len(y_train) == len(x_train) and len(y_test) == len(x_test)


@pytest.mark.slow
def test_seed_settings_reach_085_with_both_layers(tmp_path):
    # The seed's 5 epochs on the 8,000-digit sample. Measured for the built-in layer over
    # 8 seeds: 0.875-0.952 (RMSprop with a sigmoid output is jumpy at the last epoch), so
    # the bar is 0.85 and the two layers are not asserted equal from one run.
    _, report = _demo(tmp_path, "--data", os.path.join(REPO, "tools", "data", "mnist-10k.npz"))
    for label, run in report["runs"].items():
        assert run["test_accuracy"] >= 0.85, (label, run["test_accuracy"])
