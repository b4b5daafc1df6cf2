"""An export target as one registered unit (as tf2onnx registers an op handler).

A target is a converter and a runner: `convert` writes the candidate file from the Keras
model, `run` executes a file on the target's runtime (in a child process of its own) and
returns its outputs in Keras's output order. The float driver (`export.driver`) and the
stage (`stage.verify_and_commit`) do the rest — fold, reference, comparison, float64
judgement, commit — the same for every target. A target may override `verify` where its
runtime has more to say (ONNX: the execution provider, node placement).

`TARGETS` maps a name to the module and attribute of its instance, imported on first use;
a new target is one folder under `export/` and one line here (or `register_target`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Mapping, Sequence

__all__ = ["Capabilities", "Conversion", "RunResult", "Target", "TARGETS", "get_target", "register_target"]


@dataclass(frozen=True)
class Capabilities:
    """What a target's files can hold."""

    fp16: bool = False  # float16 weights
    int8: bool = False  # INT8 through the shared INT8 driver
    external_data: bool = False  # weights in a companion file (written as a bundle)
    dynamic_batch: bool = True  # the batch dimension stays symbolic
    learned_int8: bool = False  # INT8 of a quantization-aware model from its learned ranges (`keras_bn_ext.qat`)


@dataclass
class Conversion:
    """What `Target.convert` wrote: the same fields for every target, its own in `detail`."""

    path: str
    inputs: list[dict] = field(default_factory=list)  # {"name", "shape"} (None: dynamic)
    output_names: list[str] = field(default_factory=list)  # Keras's output names, in order
    fold: object | None = None  # FoldReport; None without folding
    precision: str = "float32"
    batch_size: int | None = None  # None: dynamic
    op_counts: dict[str, int] = field(default_factory=dict)
    companions: list[str] = field(default_factory=list)  # files written beside `path` (a bundle)
    detail: object | None = None  # the target's own typed record (ONNX: its ExportReport)

    @property
    def bn_folded(self) -> int:
        return self.fold.bn_folded if self.fold is not None else 0


@dataclass
class RunResult:
    """What `Target.run` returned: outputs per batch in Keras's output order."""

    outputs: list[list]
    runtime: str
    runtime_version: str
    device: str = "CPU"
    latency_ms: dict[str, float] = field(default_factory=dict)  # median per batch size, when asked
    op_counts: dict[str, int] = field(default_factory=dict)  # the file's ops as the runtime reads them


class Target:
    """The interface of a target; subclasses set the class attributes and the two methods."""

    name: str = ""
    suffix: str = ""  # of the float file (".onnx")
    int8_suffix: str = ""  # of the INT8 file (".int8.onnx")
    runtime: str = ""  # the runtime that verifies the file, as pip names it
    capabilities: Capabilities = Capabilities()

    def __init_subclass__(cls, *, name: str, suffix: str, runtime: str, capabilities: Capabilities, **kwargs):
        """A target declares what it is in its class line:
        `class OnnxTarget(Target, name="onnx", suffix=".onnx", runtime="onnxruntime", capabilities=...)`;
        its INT8 files are named `.int8` + suffix."""
        super().__init_subclass__(**kwargs)
        if not name or not suffix.startswith("."):
            raise ValueError(f"a target needs a name and a suffix starting with '.'. Received: name={name!r}, "
                             f"suffix={suffix!r}")
        cls.name, cls.suffix, cls.int8_suffix, cls.runtime = name, suffix, ".int8" + suffix, runtime
        cls.capabilities = capabilities

    def convert(self, model, path, options) -> Conversion:
        """Write the model (folded per `options.fold`) to `path`, a temporary name (or, for a
        target with external data, a temporary folder under the final name)."""
        raise NotImplementedError

    def run(self, path, batches: Sequence[Mapping[str, object]], *, keras_names: Sequence[str],
            repeats: int = 0) -> RunResult:
        """Run the file on each batch (inputs by name) in a child process."""
        raise NotImplementedError

    def verify(self, model, path, conversion: Conversion, options):
        """The check the stage runs on the candidate (default: `export.verify.verify_on_target`)."""
        from keras_bn_ext.export.verify import verify_on_target

        return verify_on_target(self, model, path, options, fixed_batch=conversion.batch_size)

    def int8_quantizer(self, model, data, options, work):
        """The target's INT8 quantizer for the shared driver (`export.int8.export_int8`), with:
        `runner` (the Target that runs its files), `method` (how ranges are chosen),
        `equalize_by_default`, `can_rank`; `float_file(candidate, tag)` and
        `quantize(candidate, tag, excluded)` (paths of the float and INT8 files under `work`),
        `rank(float_file, int8_file, tag)` (worst nodes first, when `can_rank`), `copy`, `size`,
        `op_counts` and `detail(tag)` (the target's typed record, or None)."""
        raise NotImplementedError(f"the {self.name} target has no INT8 quantizer")

    def report_detail(self, conversion: Conversion, verification) -> dict:
        """The JSON sub-record of what only this target has (under its name in the report)."""
        return {}

    def check_options(self, options) -> None:
        """Refuse options the target cannot honour (ValueError, `Received:`)."""
        if options.fp16 and not self.capabilities.fp16:
            raise ValueError(f"the {self.name} target has no float16 export. Received: fp16=True")


# name -> "module:attribute" of the target's instance, imported on first use.
TARGETS: dict[str, str] = {
    "onnx": "keras_bn_ext.export.onnx.target:ONNX",
    "litert": "keras_bn_ext.export.litert.target:LITERT",
    "openvino": "keras_bn_ext.export.openvino.target:OPENVINO",
}


def register_target(name: str, spec: str) -> None:
    """Register a target ("module:attribute" of an instance of `Target`) under `name`."""
    if ":" not in spec:
        raise ValueError(f"spec must be 'module:attribute'. Received: spec={spec!r}")
    TARGETS[name] = spec


def get_target(target: str | Target) -> Target:
    """The target registered as `target` (or `target` itself, if it is one)."""
    if isinstance(target, Target):
        return target
    if target not in TARGETS:
        raise ValueError(f"target must be one of {sorted(TARGETS)}. Received: target={target!r}")
    module, attribute = TARGETS[target].split(":")
    return getattr(importlib.import_module(module), attribute)
