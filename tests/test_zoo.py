"""tools/zoo.py --quick: models nobody here wrote, folded, saved, reloaded, exported and
verified; every row within 1e-5 (the full sweep's output is docs/ZOO.md)."""

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


def test_quick_zoo_is_all_green(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "zoo.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=1800, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    report = json.loads((tmp_path / "zoo.json").read_text())
    bad = {r["model"]: r["status"] for r in report["rows"] if r["status"] != "ok"}
    assert result.returncode == 0 and not bad, (bad, result.stdout[-2000:])
    assert len(report["rows"]) >= 6 and (tmp_path / "ZOO.md").exists()
    for row in report["rows"]:
        assert row["bn_counted"] == row["bn_total"] and row["onnx_bn_ops"] == 0
        # The bar, float32 against float32 (no float64 judgement needed here).
        assert row["fold_max_rel_err"] <= 1e-5 and row["onnx_max_rel_err"] <= 1e-5, row["model"]
        for target in ("litert", "openvino"):  # --quick converts three of them to LiteRT and OpenVINO
            if row[f"{target}_passed"] is not None:
                assert row[f"{target}_max_rel_err"] <= 1e-5, (target, row["model"])
    assert sum(r["litert_passed"] is True for r in report["rows"]) == 3
    assert sum(r["openvino_passed"] is True for r in report["rows"]) == 3
    # HGNetV2 holds all its BNs inside custom layers: replaced by their graphs, all fold.
    (hgnet,) = [r for r in report["rows"] if r["model"] == "HGNetV2Backbone"]
    assert hgnet["inlined"] > 0 and hgnet["bn_folded"] == hgnet["bn_total"]
