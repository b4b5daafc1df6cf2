"""The INT8 format follows the CPU: reduce_range exactly where u8*s8 pairs can saturate."""

import pytest

from keras_bn_ext.export.onnx.cpu import TARGETS, classify, cpu_target, detect_cpu


@pytest.mark.parametrize("machine,flags,name,reduce_range", [
    ("x86_64", {"avx2", "fma"}, "avx2", True),  # this project's EPYC
    ("x86_64", {"avx2", "avx512f", "avx512bw"}, "avx512", True),  # Skylake-SP: no VNNI
    ("x86_64", {"avx2", "avx512f", "avx512bw", "avx512_vnni"}, "vnni", False),  # Cascade Lake and later
    ("x86_64", {"avx2", "avx_vnni"}, "vnni", False),  # Alder Lake: VNNI without AVX-512
    ("x86_64", {"sse4_2"}, "unknown", True),
    ("aarch64", {"asimd", "asimddp"}, "arm64", False),
    ("riscv64", set(), "unknown", True),
])
def test_classify(machine, flags, name, reduce_range):
    got, _ = classify(machine, flags)
    assert got == name
    assert cpu_target(got).reduce_range is reduce_range


def test_detect_cpu_is_one_of_the_targets_and_says_why():
    target = detect_cpu()
    assert target.name in TARGETS and target.detected and target.reason
    assert cpu_target("vnni").detected is False


def test_unknown_target_is_refused():
    with pytest.raises(ValueError, match="Received: name='sse'"):
        cpu_target("sse")
