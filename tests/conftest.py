import functools
import os

# Quiet TensorFlow's C++ logging in test output (set before TensorFlow loads).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

NCHW_SKIP_REASON = (
    "TensorFlow cannot run channels_first (NCHW) convolutions on this CPU (it needs oneDNN, "
    "i.e. AVX-512); these tests run under the JAX backend instead "
    "(tests/test_backends.py::test_nchw_tests_pass_under_jax)"
)


@functools.lru_cache(maxsize=None)
def backend_runs_nchw_conv() -> bool:
    """Whether this backend on this CPU runs a channels_first Conv2D (TensorFlow only with
    its oneDNN kernels, which depend on the CPU; JAX always)."""
    try:
        conv = keras.layers.Conv2D(1, 1, data_format="channels_first", name="nchw_probe")
        keras.ops.convert_to_numpy(conv(np.zeros((1, 1, 2, 2), "float32")))
        return True
    except Exception:  # noqa: BLE001 - TensorFlow raises UnimplementedError / InvalidArgumentError
        return False
    finally:
        keras.backend.clear_session()  # tests rely on Keras's default layer names


# The files with the longest tests (child processes that run a whole tool or test suite:
# minutes each on a 2-core machine), longest first. pytest-xdist (`-n 2 --dist loadfile
# --no-loadscope-reorder`, setup.cfg) hands files to its workers in collection order: these
# start first and the short files fill the gaps after them, so no worker is left with a long
# file at the end. (xdist's own reordering, by test count, put the one-test zoo and
# benchmark files last: 5 minutes with one worker idle.)
LONGEST_FILES = ("test_backends.py", "test_zoo.py", "test_bench.py", "test_lenet_mnist.py", "test_gpu_check.py",
                 "test_kerashub.py", "test_op_coverage.py", "test_verification_holes.py", "test_onnx_structure.py")


def pytest_collection_modifyitems(config, items):
    nchw = [item for item in items if item.get_closest_marker("nchw_conv")]
    if nchw and not backend_runs_nchw_conv():
        for item in nchw:
            item.add_marker(pytest.mark.skip(reason=NCHW_SKIP_REASON))
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    """Each test starts from the same seed, default dtype policy and no leftover names."""
    keras.utils.set_random_seed(1234)
    keras.config.set_dtype_policy("float32")
    yield
    keras.config.set_dtype_policy("float32")
    keras.backend.clear_session()
