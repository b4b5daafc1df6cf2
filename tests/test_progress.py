"""On a terminal the tools show each phase as it runs; with --json, or when stderr is not a
terminal, nothing extra (a pseudo-terminal stands in for the user's)."""

import os
import pty
import re
import subprocess

import pytest

from keras_bn_ext import progress
from tests.helpers import BIN, copy_int8_fixture

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
    for name in ("load", "fold", "verify", "save", "reload", "verify file"):
        assert f"✓ {name} (" in terminal, (name, terminal[-2000:])
    code, out, terminal = _on_a_terminal([os.path.join(BIN, "bn-fold"), str(model), "-o", str(tmp_path / "g.keras"),
                                          "--json"])
    assert code == 0 and "✓" not in terminal and out.lstrip().startswith("{")


def test_no_reporter_means_nothing_is_shown(capsys):
    with progress.phase("anything"):
        pass
    assert capsys.readouterr() == ("", "")
