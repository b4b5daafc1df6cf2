"""What the CLIs do when the machine, not the model, is the problem: SIGTERM (a CI
timeout, `timeout`, a container stop), a full disk, a permission error, a pickled inputs
file, and a user whose Keras backend is JAX."""

import errno
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from keras_bn_ext.cli import export_onnx as cli
from tests.helpers import BIN, REPO, copy_int8_fixture

@pytest.fixture
def model(tmp_path):
    from pathlib import Path

    return Path(copy_int8_fixture(tmp_path))


def _leftovers(folder, name):
    return [p for p in os.listdir(folder) if p.startswith(f".{name}.")]


def test_sigterm_during_export_removes_temporary_files(model, tmp_path):
    out = tmp_path / "out.onnx"
    proc = subprocess.Popen([os.path.join(BIN, "bn-export-onnx"), str(model), "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not _leftovers(tmp_path, out.name) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the export finished before its temporary file was seen"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, err[-3000:])
    assert "terminated (SIGTERM)" in err
    assert not out.exists() and not _leftovers(tmp_path, out.name)


@pytest.mark.parametrize("code,words", [(errno.ENOSPC, "no space left on device"),
                                        (errno.EACCES, "permission denied")])
def test_os_errors_while_writing_are_one_plain_line(model, tmp_path, capsys, monkeypatch, code, words):
    import onnx

    def failing_save(proto, path, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(onnx, "save_model", failing_save)
    out = tmp_path / "out.onnx"
    assert cli.main([str(model), "-o", str(out), "--provider", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and "unexpected" not in err[0], err
    assert not out.exists() and not _leftovers(tmp_path, out.name)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="a real full disk needs root (tmpfs)")
def test_a_really_full_disk(model, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("tmpfs cannot be mounted here")
    try:
        result = subprocess.run([os.path.join(BIN, "bn-export-onnx"), str(model), "-o", str(disk / "out.onnx")],
                                capture_output=True, text=True, timeout=600)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and "no space left on device" in lines[-1], result.stderr[-2000:]
        assert os.listdir(disk) == []
    finally:
        subprocess.run(["umount", str(disk)])


def test_pickled_inputs_file_is_refused_plainly(model, tmp_path, capsys):
    bad = tmp_path / "inputs.npz"
    np.savez(bad, image=np.array([np.zeros((28, 28, 1)), "x"], dtype=object))
    assert cli.main([str(model), "--inputs", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "pickled" in err and "unexpected" not in err and len(err.splitlines()) == 1


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax not installed")
def test_tools_run_on_tensorflow_whatever_the_backend_setting(model, tmp_path):
    env = dict(os.environ, KERAS_BACKEND="jax")
    out = tmp_path / "out.onnx"
    result = subprocess.run([os.path.join(BIN, "bn-export-onnx"), str(model), "-o", str(out), "--provider", "cpu"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.exists()
    # The Python API on JAX: a clear error that names the fix.
    code = (f"import keras, keras_bn_ext\nm = keras.saving.load_model({str(model)!r})\n"
            f"from keras_bn_ext.errors import BackendError\n"
            f"try:\n    keras_bn_ext.export_onnx(m, {str(tmp_path / 'api.onnx')!r})\n"
            f"except BackendError as e:\n    print('BACKEND', e)\n")
    api = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert "BACKEND" in api.stdout and "KERAS_BACKEND=tensorflow" in api.stdout and "'jax'" in api.stdout, \
        api.stdout + api.stderr[-2000:]
