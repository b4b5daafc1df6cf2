"""tools/op_coverage.py --quick: the ops that tf2onnx lacked or got wrong (issue 26) convert
and verify on onnxruntime, the ones ONNX cannot express as TensorFlow computes them are
refused by name, and none is written wrong (the full sweep's output is docs/OPS.md)."""

import json
import os
import subprocess
import sys

import keras
import pytest

from tests.helpers import REPO

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="the export needs TensorFlow"),
]

# Every op of the quick set converts now (antialiased and Lanczos resizes included).
REFUSED: dict = {}


def test_quick_sweep_converts_everything_onnx_can_express(tmp_path):
    out, rows_path = tmp_path / "OPS.md", tmp_path / "ops.json"
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "op_coverage.py"), "--quick", "--targets", "onnx",
         "--out", str(out), "--json", str(rows_path)],
        capture_output=True, text=True, timeout=1200, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(rows_path.read_text())
    assert len(rows) >= 15 and out.exists()
    for row in rows:
        onnx = row["onnx"]
        if row["name"] in REFUSED:
            assert onnx["status"] == "refused" and onnx["op"] == REFUSED[row["name"]], row
        else:
            # The exports' own bar: float32 within 1e-5 relative, no NaN/inf astray.
            assert onnx["status"] == "converts" and onnx["nonfinite_mismatches"] == 0, row
            assert onnx["max_rel_err"] <= 1e-5 or onnx["float64"] == "agrees", row
