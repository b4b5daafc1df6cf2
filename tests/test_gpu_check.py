"""tools/gpu_check.py's CPU half: prepare here, then `check` under JAX on a machine
without a GPU still writes its report, including the onnxruntime CUDA part (which says
what ran). The GPU half is run on a lent GPU machine (README, GPU notes)."""

import json
import os
import subprocess
import sys

import keras
import pytest

from tests.helpers import REPO

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="prepare exports with tf2onnx"),
]


def test_prepare_then_check_writes_the_report(tmp_path):
    pytest.importorskip("jax")
    script = os.path.join(REPO, "tools", "gpu_check.py")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    prepared = subprocess.run([sys.executable, script, "prepare", str(tmp_path / "d")], capture_output=True,
                              text=True, env=env, timeout=900)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    report_path = tmp_path / "report.json"
    checked = subprocess.run([sys.executable, script, "check", str(tmp_path / "d"), "--out", str(report_path)],
                             capture_output=True, text=True, env=dict(env, KERAS_BACKEND="jax"), timeout=900)
    report = json.loads(report_path.read_text())
    on_gpu = any("cuda" in d.lower() or "gpu" in d.lower() for d in report["devices"])
    assert checked.returncode == (0 if on_gpu else 1), checked.stderr[-3000:]
    for entry in report["models"].values():
        assert entry["onnx_cpu_vs_tf_cpu"] <= 1e-5
        cuda = entry["onnxruntime_cuda"]
        if "skipped" not in cuda:
            for run in cuda.values():
                assert run["provider"] in ("CUDAExecutionProvider", "CPUExecutionProvider")
                # TF32 keeps 10 mantissa bits: measured 4.1e-4 to 7.7e-4 relative on an H100;
                # 2e-3 leaves margin. With TF32 off, float32 in another order (~1e-6).
                assert run["vs_tf_cpu_reference"] <= (1e-5 if run is cuda["tf32_off"] else 2e-3)
