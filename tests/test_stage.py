"""The verify-and-commit stage: candidate at a temporary path, checked there, renamed or removed."""

import os
from dataclasses import dataclass

import pytest

from keras_bn_ext.stage import COMMIT_CODES, verify_and_commit


@dataclass
class Verdict:
    passed: bool
    seen: str = ""


def _write(text):
    def produce(tmp):
        tmp.write_text(text)
        return len(text)
    return produce


def _read_check(passed):
    return lambda tmp, product: Verdict(passed, tmp.read_text())


def _leftovers(directory, keep):
    return sorted(n for n in os.listdir(directory) if n not in keep)


def test_a_passing_candidate_is_checked_where_it_lies_then_renamed(tmp_path):
    out = tmp_path / "m.onnx"
    seen = {}

    def check(tmp, product):
        seen.update(path=tmp, exists=tmp.exists(), product=product)
        return Verdict(True, tmp.read_text())

    staged = verify_and_commit(out, _write("abc"), check, produce_name="export")
    # The check ran on the temporary file, beside the output and with its suffix.
    assert seen["exists"] and seen["path"].parent == tmp_path and seen["path"].suffix == ".onnx"
    assert seen["product"] == 3 and staged.product == 3 and staged.check.seen == "abc"
    assert out.read_text() == "abc" and _leftovers(tmp_path, {"m.onnx"}) == []
    record = staged.record
    assert record.committed and record.output == str(out) and record.code == "passed"
    assert set(record.timings_s) == {"export", "verify"}
    assert record.to_dict()["reason"] == COMMIT_CODES["passed"]


def test_a_failing_candidate_leaves_nothing_and_keeps_the_old_file(tmp_path):
    out = tmp_path / "m.keras"
    out.write_text("old")
    staged = verify_and_commit(out, _write("new"), _read_check(False))
    assert not staged.record.committed and staged.record.code == "not_written"
    assert staged.check.seen == "new" and out.read_text() == "old"
    assert _leftovers(tmp_path, {"m.keras"}) == []


@pytest.mark.parametrize("keep", [True, lambda check: check.seen == "new"])
def test_a_failing_candidate_can_be_kept_for_inspection(tmp_path, keep):
    out = tmp_path / "m.tflite"
    staged = verify_and_commit(out, _write("new"), _read_check(False), keep_failed=keep)
    assert staged.record.code == "kept_failed" and staged.record.output == str(out)
    assert out.read_text() == "new" and not staged.check.passed


def test_the_keep_predicate_can_refuse(tmp_path):
    out = tmp_path / "m.tflite"
    staged = verify_and_commit(out, _write("new"), _read_check(False), keep_failed=lambda check: False)
    assert staged.record.code == "not_written" and not out.exists()


@pytest.mark.parametrize("where", ["produce", "check"])
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_an_error_or_interrupt_removes_the_candidate(tmp_path, where, error):
    """KeyboardInterrupt stands for SIGINT and for SIGTERM, which the CLIs turn into it."""
    out = tmp_path / "m.onnx"

    def produce(tmp):
        tmp.write_text("half")
        if where == "produce":
            raise error()

    def check(tmp, product):
        raise error()

    with pytest.raises(error):
        verify_and_commit(out, produce, check)
    assert _leftovers(tmp_path, set()) == []


def test_a_bundle_is_checked_under_its_final_names_and_committed_together(tmp_path):
    """A model that names its data file relative to itself (ONNX external data) must be
    checked where that name resolves, and both files must land, or neither."""
    out = tmp_path / "m.onnx"
    seen = {}

    def produce(tmp):
        assert tmp.name == "m.onnx" and tmp.parent != tmp_path  # final name, in a temporary directory
        (tmp.parent / "m.onnx.data").write_text("weights")
        tmp.write_text("model -> m.onnx.data")

    def check(tmp, _):
        seen["data"] = (tmp.parent / "m.onnx.data").read_text()
        return Verdict(True)

    staged = verify_and_commit(out, produce, check, bundle=True)
    assert seen["data"] == "weights" and staged.record.code == "passed"
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]
    assert (tmp_path / "m.onnx.data").read_text() == "weights"


@pytest.mark.parametrize("error", [None, RuntimeError, KeyboardInterrupt])
def test_a_failed_or_interrupted_bundle_leaves_nothing(tmp_path, error):
    out = tmp_path / "m.onnx"
    (tmp_path / "m.onnx.data").write_text("old weights")  # a previous export's data stays as it was

    def produce(tmp):
        (tmp.parent / "m.onnx.data").write_text("new")
        tmp.write_text("model")

    def check(tmp, _):
        if error:
            raise error()
        return Verdict(False)

    if error:
        with pytest.raises(error):
            verify_and_commit(out, produce, check, bundle=True)
    else:
        assert verify_and_commit(out, produce, check, bundle=True).record.code == "not_written"
    assert sorted(os.listdir(tmp_path)) == ["m.onnx.data"]
    assert (tmp_path / "m.onnx.data").read_text() == "old weights"
