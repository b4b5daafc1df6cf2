"""The layer's tests again under the JAX and PyTorch backends (the backend is chosen at
import time, so they run in a child pytest)."""

import importlib.util
import os
import subprocess
import sys

import keras
import pytest

from tests.helpers import REPO


LAYER_TESTS = ["tests/test_batch_normalization.py", "tests/test_serialization.py",
               "tests/test_ghost_batch_normalization.py", "tests/test_recalibration.py",
               "tests/test_keras_batch_normalization_port.py", "tests/test_qat.py"]
# CI time: recalibration and serialization are Keras-level code above the layer; JAX
# reruns them, PyTorch reruns the layer's own suites.
BACKEND_TESTS = {"jax": LAYER_TESTS,
                 "torch": [t for t in LAYER_TESTS if t not in ("tests/test_recalibration.py",
                                                                "tests/test_serialization.py")]}


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="already on another backend")
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_layer_tests_pass_under_other_backends(backend):
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} not installed (the test extra brings it on Linux x86_64, Python 3.11)")
    env = dict(os.environ, KERAS_BACKEND=backend)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", *BACKEND_TESTS[backend]],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax not installed")
def test_nchw_tests_pass_under_jax():
    """Folding is backend-independent; channels_first convolutions run on any CPU under
    JAX, so those tests run there on every machine (TensorFlow needs oneDNN for them)."""
    if keras.backend.backend() == "jax":
        pytest.skip("already on JAX")
    env = dict(os.environ, KERAS_BACKEND="jax")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "-m", "nchw_conv", "tests/test_fold.py"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout
