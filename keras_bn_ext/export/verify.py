"""`verify_on_target`: a written file against the Keras model it came from, on the target's
runtime, the same way for every target: seeded random batches of each size through the
file's dynamic batch (or the user's real inputs), the Keras model's inference outputs as the
reference, per-output errors (`compare`), and where float32 against float32 misses the
tolerance, the float64 judgement (`compare.exact_arithmetic_check`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import keras
import numpy as np

from keras_bn_ext.compare import (
    ComparisonReport,
    ExactArithmeticCheck,
    check_inputs,
    compare_output_lists,
    exact_arithmetic_check,
    input_specs,
    keras_outputs,
    output_names,
    random_inputs,
)

__all__ = ["Verification", "run_arrays", "verify_on_target", "verification_batches"]

BENCHMARK_REPEATS = 30


@dataclass
class Verification:
    """The verdict on a file: the comparison, what ran it, and (on a miss) the float64 judgement."""

    comparison: ComparisonReport
    runtime: str
    runtime_version: str
    device: str = "CPU"
    batch_sizes: list[int] = field(default_factory=list)
    op_counts: dict[str, int] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)
    exact: ExactArithmeticCheck | None = None  # only when `comparison` failed
    detail: object | None = None  # the target's own typed record (ONNX: its VerificationReport)

    @property
    def passed(self) -> bool:
        return self.comparison.passed or (self.exact is not None and self.exact.passed)


def run_arrays(target, path, arrays, *, input_names, keras_names, batch_size: int = 256):
    """Run the file on `target` over `arrays` (samples on axis 0) in batches of `batch_size`;
    (one array per Keras output, the batches concatenated; the `RunResult` of the run)."""
    from keras_bn_ext.data import array_batches

    feeds = [dict(zip(input_names, b)) for b in array_batches(arrays, batch_size)]
    ran = target.run(path, feeds, keras_names=keras_names)
    return [np.concatenate([b[j] for b in ran.outputs]) for j in range(len(keras_names))], ran


def verification_batches(model: keras.Model, options, *, fixed_batch: int | None = None, seed: int = 0) -> list:
    """The batches a file is verified on: `options.inputs` cut into batches (of the file's
    fixed batch, if any), else `options.samples` seeded random batches of each size."""
    if options.inputs is not None:
        inputs = list(options.inputs)
        check_inputs(model, inputs)
        n = fixed_batch or len(inputs[0])
        return [[a[i:i + n] for a in inputs] for i in range(0, len(inputs[0]), n)]
    sizes = (fixed_batch,) if fixed_batch else options.batch_sizes
    return [random_inputs(model, batch_size=bs, seed=seed + 100 * i + bs) for i in range(options.samples) for bs in sizes]


def verify_on_target(target, model: keras.Model, path, options, *, fixed_batch: int | None = None) -> Verification:
    """Run the file at `path` on `target`'s runtime and compare it with `model` (inference,
    float32) under `options.tolerances`."""
    atol, rtol = options.tolerances
    batches = verification_batches(model, options, fixed_batch=fixed_batch)
    names = [n for n, _, _ in input_specs(model)]
    keras_names = output_names(model)
    ran = target.run(path, [dict(zip(names, b)) for b in batches], keras_names=keras_names,
                     repeats=BENCHMARK_REPEATS if options.benchmark else 0)
    reference = [keras_outputs(model, b) for b in batches]
    comparison = compare_output_lists(reference, ran.outputs, keras_names, atol=atol, rtol=rtol)
    exact = None
    if not comparison.passed:
        exact = exact_arithmetic_check(model, batches, ran.outputs, atol=atol, rtol=rtol, model_outputs=reference)
    return Verification(comparison=comparison, runtime=ran.runtime, runtime_version=ran.runtime_version,
                        device=ran.device, batch_sizes=sorted({int(b[0].shape[0]) for b in batches}),
                        op_counts=ran.op_counts, latency_ms=ran.latency_ms, exact=exact)
