"""On a terminal the tools show each phase as it runs; with --json, or when stderr is not a
terminal, nothing extra (a pseudo-terminal stands in for the user's)."""

import os
import pty
import re
import subprocess

import pytest

from keras_bn_ext import progress
from tests.helpers import BIN, copy_int8_fixture, mnist_digits

def _on_a_terminal(argv):
    leader, follower = pty.openpty()
    proc = subprocess.Popen(argv, stdin=follower, stdout=subprocess.PIPE, stderr=follower, close_fds=True)
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the follower side closed: the process is done
            break
        if not chunk:
            break
        seen += chunk
    out, _ = proc.communicate(timeout=600)
    os.close(leader)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", seen.decode(errors="replace"))  # rich's colours and cursor
    return proc.returncode, out.decode(), text


@pytest.fixture
def model(tmp_path):
    from pathlib import Path

    return Path(copy_int8_fixture(tmp_path))


def test_phases_are_shown_on_a_terminal_and_not_with_json(model, tmp_path):
    code, _, terminal = _on_a_terminal([os.path.join(BIN, "bn-fold"), str(model), "-o", str(tmp_path / "f.keras")])
    assert code == 0
    for name in ("load", "fold", "verify", "save", "reload and verify the file"):
        assert f"✓ {name} (" in terminal, (name, terminal[-2000:])
    code, out, terminal = _on_a_terminal([os.path.join(BIN, "bn-fold"), str(model), "-o", str(tmp_path / "g.keras"),
                                          "--json"])
    assert code == 0 and "✓" not in terminal and out.lstrip().startswith("{")


def test_no_reporter_means_nothing_is_shown(capsys):
    with progress.phase("anything"):
        pass
    assert capsys.readouterr() == ("", "")


class _Recorder:
    def __init__(self):
        self.events = []

    def start(self, name):
        self.events.append(("start", name))

    def done(self, name, seconds, ok):
        self.events.append(("done", name, ok))

    def update(self, name, completed, total):
        self.events.append(("update", name, completed, total))


def test_counted_steps_report_each_step_inside_their_phase():
    recorder = _Recorder()
    with progress.reporting(recorder):
        with progress.steps("calibrate", 2) as advance:
            for _ in range(3):  # a calibrator that reads its data again starts the count again
                advance()
        with progress.steps("cached", 0) as advance:
            advance()
    assert recorder.events == [
        ("start", "calibrate"), ("update", "calibrate", 0, 2), ("update", "calibrate", 1, 2),
        ("update", "calibrate", 2, 2), ("update", "calibrate", 1, 2), ("done", "calibrate", True),
        ("start", "cached"), ("done", "cached", True)]


def test_calibration_shows_a_bar_over_its_batches_on_a_terminal(tmp_path):
    """The batches are counted in onnxruntime's own process and reach the bar through a pipe."""
    import numpy as np

    model = copy_int8_fixture(tmp_path)
    (x_train, _), _ = mnist_digits()
    calib = tmp_path / "calib.npz"
    np.savez(calib, image=x_train[:120])  # 96 calibrated (the last fifth held out): 3 batches of 32
    code, _, terminal = _on_a_terminal([os.path.join(BIN, "bn-export-onnx"), str(model), "--int8", str(calib),
                                        "--calibration-batch-size", "32", "--fallback-budget", "0"])
    assert code in (0, 1), terminal[-2000:]
    assert "calibrate and quantize" in terminal and "/3" in terminal, terminal[-3000:]
