"""The target registry: each target declares its name, suffixes and capabilities once, in its
class line, and is found by name without importing the other targets' runtimes."""

import pytest

from keras_bn_ext.export.target import TARGETS, Capabilities, Target, get_target, register_target


def test_registered_targets_declare_themselves():
    for name in ("onnx", "litert", "openvino"):
        target = get_target(name)
        assert target.name == name and target.int8_suffix == ".int8" + target.suffix
        assert target.capabilities.int8 and target.runtime
    assert {get_target(n).suffix for n in TARGETS} >= {".onnx", ".tflite", ".xml"}


def test_a_target_instance_passes_through_and_an_unknown_name_is_refused():
    onnx = get_target("onnx")
    assert get_target(onnx) is onnx
    with pytest.raises(ValueError, match="Received: target='tflite'"):
        get_target("tflite")


def test_a_new_target_is_one_class_and_one_registration(monkeypatch):
    class Echo(Target, name="echo", suffix=".echo", runtime="none", capabilities=Capabilities()):
        pass

    monkeypatch.setitem(globals(), "ECHO", Echo())
    monkeypatch.setattr("keras_bn_ext.export.target.TARGETS", dict(TARGETS))
    register_target("echo", f"{__name__}:ECHO")
    assert get_target("echo").int8_suffix == ".int8.echo"
    with pytest.raises(ValueError, match="Received: spec='nocolon'"):
        register_target("x", "nocolon")


def test_a_target_without_a_dotted_suffix_is_refused():
    with pytest.raises(ValueError, match="Received: name='bad', suffix='bad'"):
        class Bad(Target, name="bad", suffix="bad", runtime="none", capabilities=Capabilities()):
            pass
