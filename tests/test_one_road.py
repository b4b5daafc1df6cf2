"""Every file the library writes takes one road: `stage.verify_and_commit`. Followed, not
grepped: each writing API runs with the stage wrapped, and every file that appears in the
output folder must be one the stage committed (the output and its companions), absent until
the stage renamed it there, with nothing else left behind."""

import os

import pytest

from keras_bn_ext import stage
from tests.helpers import int8_fixture, mnist_digits

TARGETS = {"onnx": ".onnx", "litert": ".tflite", "openvino": ".xml"}


@pytest.fixture
def followed(monkeypatch):
    """The paths the stage committed, checked absent when it was asked to produce them."""
    committed = []
    real = stage.verify_and_commit

    def wrapped(path, produce, check, **kwargs):
        assert not os.path.exists(path), f"{path} existed before the stage produced it"
        staged = real(path, produce, check, **kwargs)
        if staged.record.committed:
            committed.append(os.path.abspath(path))
        return staged

    monkeypatch.setattr(stage, "verify_and_commit", wrapped)
    # The modules that imported the stage's function by name see the wrapper too.
    import keras_bn_ext.export.driver as driver
    import keras_bn_ext.folding.save as fold_save
    import keras_bn_ext.recalibration.save as recalibration_save

    for module in (driver, fold_save, recalibration_save):
        monkeypatch.setattr(module, "verify_and_commit", wrapped)
    return committed


def _companions(path: str) -> set:
    """A committed file and what is written with it (OpenVINO's .bin, ONNX external data)."""
    stem, suffix = os.path.splitext(path)
    return {path} | ({stem + ".bin"} if suffix == ".xml" else set())


def _only_committed(folder, committed, before):
    written = {os.path.abspath(os.path.join(folder, f)) for f in os.listdir(folder)} - before
    allowed = set().union(*(_companions(p) for p in committed)) if committed else set()
    assert written == allowed, (sorted(written), sorted(allowed))


def test_fold_and_recalibrate_write_through_the_stage(tmp_path, followed):
    from keras_bn_ext.folding.save import fold_to_file
    from keras_bn_ext.recalibration.save import recalibrate_to_file

    model = int8_fixture("lenet_bn")
    (x, _), _ = mnist_digits()
    fold_to_file(model, tmp_path / "f.keras", samples=1)
    recalibrate_to_file(model, [x[:64]], tmp_path / "r.keras")
    assert len(followed) == 2
    _only_committed(tmp_path, followed, set())


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_export_writes_through_the_stage(tmp_path, followed, target):
    if target == "openvino":
        pytest.importorskip("openvino")
    from keras_bn_ext.export.driver import export_verified
    from keras_bn_ext.export.int8 import Int8Options, export_int8
    from keras_bn_ext.export.options import ExportOptions

    model = int8_fixture("lenet_bn")
    (x, _), (x_test, _) = mnist_digits()
    suffix = TARGETS[target]
    export_verified(model, tmp_path / f"m{suffix}", target=target, options=ExportOptions(samples=1))
    # The road is what is checked here, not the accuracy (tests/test_int8.py judges that).
    export_int8(model, tmp_path / f"m.int8{suffix}", [x[:64]], target=target, eval_data=[x_test[:32]],
                options=Int8Options(fallback_budget=0, equalize="off"))
    assert len(followed) == 2
    _only_committed(tmp_path, followed, set())
    assert all(os.path.getsize(p) > 0 for p in followed)
