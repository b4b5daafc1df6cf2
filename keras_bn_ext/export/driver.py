"""`export_verified`: the float export of every target — convert under a temporary name,
verify there on the target's runtime, commit by a rename (a file outside the tolerance is
still renamed, for inspection, and says so; an error leaves nothing behind).

The report is one class for every target (`ExportResult`): its JSON keys mean the same
thing whatever the target, and what only one target has sits under the target's name."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import keras

from keras_bn_ext.export.options import ExportOptions
from keras_bn_ext.export.target import Conversion, Target, get_target
from keras_bn_ext.stage import StageRecord, verify_and_commit

__all__ = ["ExportResult", "export_verified"]


@dataclass
class ExportResult:
    """A verified float export: what was written, how it was checked, what the stage did."""

    target: str
    export: Conversion
    verification: object  # export.verify.Verification (ONNX: its VerificationReport, same fields)
    timings_s: dict[str, float] = field(default_factory=dict)
    stage: StageRecord | None = None
    detail: dict = field(default_factory=dict)  # the target's own JSON fields (`Target.report_detail`)

    @property
    def passed(self) -> bool:
        return self.verification.passed

    @property
    def precision(self) -> str:
        return self.export.precision

    def to_dict(self) -> dict:
        e, v = self.export, self.verification
        return {
            "target": self.target,
            "output": e.path,
            "precision": e.precision,
            "folded": e.fold is not None,
            "bn_folded": e.bn_folded,
            "fold": e.fold.to_dict() if e.fold else None,
            "inputs": e.inputs,
            "output_names": e.output_names,
            "batch_size": e.batch_size,
            "runtime": v.runtime,
            "runtime_version": v.runtime_version,
            "device": v.device,
            "batch_sizes": v.batch_sizes,
            "atol": v.comparison.atol,
            "rtol": v.comparison.rtol,
            "outputs": [vars(o) for o in v.comparison.outputs],
            "op_counts": e.op_counts,
            "latency_ms": v.latency_ms,
            "exact_arithmetic": v.exact.to_dict() if v.exact else None,
            "timings_s": self.timings_s,
            "commit": self.stage.code if self.stage else None,
            "passed": self.passed,
            self.target: self.detail,
        }


def export_verified(model: keras.Model, path: str | os.PathLike, *, target: str | Target = "onnx",
                    options: ExportOptions = ExportOptions()) -> ExportResult:
    """Export `model` to `path` with `target` ("onnx", "litert", "openvino", or a `Target`)
    and verify the file on the target's runtime against the Keras model.

    Raises:
        ExportError, VerificationError, InputDataError, UnknownLayerError, ValueError (an
        option the target cannot honour), and the target's own (GPUUnavailableError).
    """
    unit = get_target(target)
    unit.check_options(options)
    staged = verify_and_commit(
        path, lambda tmp: unit.convert(model, tmp, options),
        lambda tmp, conversion: unit.verify(model, tmp, conversion, options),
        keep_failed=True,  # a file outside the tolerance is kept for inspection (exit 1)
        produce_name="export", produce_phase=f"fold and convert ({unit.name})",
        check_phase=f"verify on {unit.runtime}", bundle=unit.capabilities.external_data)
    conversion = staged.product
    conversion.path = str(path)  # the names it was written under, not the temporary ones
    if not conversion.op_counts:  # a converter that cannot list them: the runtime's reading of the file
        conversion.op_counts = dict(staged.check.op_counts)
    conversion.companions = [os.path.join(os.path.dirname(str(path)), os.path.basename(c))
                             for c in conversion.companions]
    return ExportResult(target=unit.name, export=conversion, verification=staged.check,
                        timings_s=staged.record.timings_s, stage=staged.record,
                        detail=unit.report_detail(conversion, staged.check))
