"""Which INT8 format suits the CPU that will run the file (imports nothing heavy).

onnxruntime's x86 int8 kernels multiply u8 activations by s8 weights. Without VNNI
(`vpdpbusd`) they use `vpmaddubsw`, which adds pairs of u8*s8 products into a *saturating*
int16: two 8-bit products reach 2 * 255 * 127 = 64,770 > 32,767, so large activations times
large weights clip (onnxruntime issues #6545, #12072). With 7-bit weights (`reduce_range`:
-64..63) a pair stays below 32,767. VNNI adds the products in int32 and needs nothing; ARM's
int8 dot products (`sdot`/`udot`, or widening multiplies) do not saturate either.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass

__all__ = ["CpuTarget", "TARGETS", "detect_cpu", "cpu_target"]

# name -> (reduce_range, why)
_RULES = {
    "vnni": (False, "x86 with VNNI: u8*s8 products are summed in int32, no saturation; full 8-bit weights"),
    "avx512": (True, "x86 AVX-512 without VNNI: vpmaddubsw sums pairs of u8*s8 products in a saturating "
                     "int16; 7-bit weights (reduce_range) keep every pair in range"),
    "avx2": (True, "x86 AVX2 without VNNI: vpmaddubsw sums pairs of u8*s8 products in a saturating int16; "
                   "7-bit weights (reduce_range) keep every pair in range"),
    "arm64": (False, "ARM64: int8 dot products accumulate in int32, no saturation; full 8-bit weights"),
    "unknown": (True, "CPU not recognized: 7-bit weights (reduce_range), which cannot saturate on any "
                      "onnxruntime kernel, at a small cost in weight resolution"),
}
TARGETS = ("auto",) + tuple(_RULES)


@dataclass(frozen=True)
class CpuTarget:
    name: str  # vnni | avx512 | avx2 | arm64 | unknown
    reduce_range: bool
    reason: str
    detected: bool  # True: this machine's CPU; False: named by the caller (--target-cpu)
    flags: tuple[str, ...] = ()  # the int8-relevant CPU flags seen (detected targets)

    def to_dict(self) -> dict:
        return {**asdict(self), "flags": list(self.flags)}


def _linux_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def classify(machine: str, flags: set[str]) -> tuple[str, tuple[str, ...]]:
    """The target name for a CPU architecture (`platform.machine()`) and its flags."""
    machine = machine.lower()
    if machine in ("aarch64", "arm64"):
        return "arm64", tuple(sorted(flags & {"asimddp", "i8mm"}))
    if machine not in ("x86_64", "amd64", "i686", "x86"):
        return "unknown", ()
    seen = tuple(sorted(f for f in flags if f in {"avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
                                                  "amx_int8"}))
    if {"avx512_vnni", "avx_vnni", "amx_int8"} & flags:
        return "vnni", seen
    if "avx512bw" in flags:
        return "avx512", seen
    if "avx2" in flags:
        return "avx2", seen
    return "unknown", seen


def detect_cpu() -> CpuTarget:
    """This machine's CPU as an INT8 target (Linux: /proc/cpuinfo; macOS arm64: ARM64)."""
    machine = platform.machine()
    flags = _linux_flags() if os.path.exists("/proc/cpuinfo") else set()
    if not flags and machine.lower() not in ("arm64", "aarch64"):
        name, seen = "unknown", ()
    else:
        name, seen = classify(machine, flags)
    reduce_range, reason = _RULES[name]
    return CpuTarget(name, reduce_range, reason, detected=True, flags=seen)


def cpu_target(name: str = "auto") -> CpuTarget:
    """`detect_cpu()` for "auto", else the named target (quantizing for another machine)."""
    if name == "auto":
        return detect_cpu()
    if name not in _RULES:
        raise ValueError(f"target CPU must be one of {TARGETS}. Received: name={name!r}")
    reduce_range, reason = _RULES[name]
    return CpuTarget(name, reduce_range, reason, detected=False)
