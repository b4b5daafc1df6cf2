"""Smoke test: tools/bench.py --smoke (every section's code once, on the smallest inputs) keeps
working. No timing is asserted here; the full benchmark stays outside the tests."""

import json
import os
import subprocess
import sys

import keras
import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="bench exports with tf2onnx")


@pytest.mark.slow
def test_bench_quick_runs_and_writes_reports(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "bench.py"), "--smoke", "--repeats", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["quick"] and report["smoke"] and report["train"]["ratio"] > 0
    assert report["train"]["qat_ratio"] > 0
    assert {r["model"] for r in report["inference"]} == {"LeNet-BN", "MobileNetV2"}
    for row in report["inference"]:
        # The twin is the folded model rebuilt independently: same numbers.
        assert row["twin_max_abs_diff"] < 1e-5
    assert report["tools"]["bn_fold"]["timings_s"]["fold"] > 0
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert "Training step" in text and "folded/twin" in text and "bn-fold" in text and "Start-up" in text
    assert report["startup"]["seconds"]["bn-fold --help"]["median"] > 0
    # Section 6: the guarded export agrees with Keras on a default onnxruntime session.
    guard = report["pad_guard"]
    assert guard["guards"] == 1 and guard["max_rel_err"]["guarded"] <= 1e-5 and "Pad_Fusion" in text
    # Section 7: both recalibration modes ran; exact mode repaired the lagging LeNet.
    recal = report["recalibration"]
    assert recal["bn"] == 53 and recal["levels"] == 49 and "BN recalibration" in text
    assert recal["lenet"]["exact"] > recal["lenet"]["inference_before"]
    q = report["int8"]  # section 8, reduced: the depthwise-separable fixture, its accuracy and its latency
    assert set(q["accuracy"]) == {"dwsep"} and "INT8" in text
    assert q["speed"]["dwsep 28"]["size_ratio"] < 1
