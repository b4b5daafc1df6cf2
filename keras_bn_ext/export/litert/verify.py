"""`verify_litert`: a LiteRT file against the Keras model it came from, on ai-edge-litert's
interpreter (in a child process), batch sizes 1 and 8 through the dynamic batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

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
from keras_bn_ext.errors import VerificationError
from keras_bn_ext.export.litert import _litert_worker
from keras_bn_ext.export.litert.convert import SIGNATURE
from keras_bn_ext.export.onnx import options

__all__ = ["LiteRTVerification", "run_litert", "verify_litert"]


@dataclass
class LiteRTVerification:
    comparison: ComparisonReport
    batch_sizes: list[int] = field(default_factory=list)
    runtime_version: str = ""
    op_counts: dict[str, int] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)
    exact: ExactArithmeticCheck | None = None  # only when `comparison` failed

    @property
    def passed(self) -> bool:
        return self.comparison.passed or (self.exact is not None and self.exact.passed)

    def to_dict(self) -> dict:
        return {"runtime": "ai-edge-litert", "runtime_version": self.runtime_version, "batch_sizes": self.batch_sizes,
                **self.comparison.to_dict(), "exact_arithmetic": self.exact.to_dict() if self.exact else None,
                "op_counts": self.op_counts, "latency_ms": self.latency_ms, "passed": self.passed}


def run_litert(path: str | os.PathLike, batches: Sequence[Mapping[str, np.ndarray]], *, keras_names: Sequence[str],
               repeats: int = 0) -> tuple[list[list[np.ndarray]], dict]:
    """Run the LiteRT file's signature on each batch (inputs by name) in a child process;
    outputs per batch in `keras_names` order. The signature's names must be Keras's."""
    input_names = list(batches[0])
    meta = {"model": str(Path(path).resolve()), "signature": SIGNATURE, "input_names": input_names,
            "batches": len(batches), "repeats": repeats}
    arrays = {f"b{i}__{n}": np.ascontiguousarray(b[n]) for i, b in enumerate(batches) for n in input_names}
    with tempfile.TemporaryDirectory(prefix="keras_bn_ext_litert_") as tmp:
        request, response = os.path.join(tmp, "request.npz"), os.path.join(tmp, "response.npz")
        np.savez(request, __meta__=np.array(json.dumps(meta)), **arrays)
        proc = subprocess.run([sys.executable, _litert_worker.__file__, request, response],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise VerificationError(f"the LiteRT interpreter failed on {path}: {last[:400]}")
        with np.load(response, allow_pickle=False) as res:
            out_meta = json.loads(str(res["__meta__"]))
            if sorted(out_meta["output_names"]) != sorted(keras_names) or \
                    sorted(out_meta["input_names"]) != sorted(input_names):
                raise VerificationError(
                    f"LiteRT signature names {out_meta['input_names']} -> {out_meta['output_names']} are not the "
                    f"Keras names {input_names} -> {list(keras_names)}")
            outputs = [[res[f"b{i}__{n}"] for n in keras_names] for i in range(len(batches))]
    return outputs, out_meta


def verify_litert(
    model: keras.Model,
    path: str | os.PathLike,
    *,
    inputs: Sequence[np.ndarray] | None = None,
    samples: int = options.SAMPLES,
    batch_sizes: Sequence[int] = options.BATCH_SIZES,
    atol: float = options.FP32_ATOL,
    rtol: float = options.FP32_RTOL,
    seed: int = 0,
    benchmark: bool = False,
    fixed_batch: int | None = None,
) -> LiteRTVerification:
    """Compare the LiteRT file's outputs on ai-edge-litert with the Keras model's (inference,
    float32): random batches of each size in `batch_sizes` (the interpreter resizes its
    dynamic batch for each) or the given real `inputs`. Where float32 against float32 misses
    the tolerance, the float64 judgement of the ONNX target decides (`exact`).
    `fixed_batch`: the file's batch is fixed (`LiteRTExportReport.batch_size`): every
    batch has that size (the inputs are split into such batches)."""
    if fixed_batch is not None:
        batch_sizes = (fixed_batch,)
    if inputs is not None:
        check_inputs(model, inputs)
        n = fixed_batch or len(inputs[0])
        batches = [[a[i:i + n] for a in inputs] for i in range(0, len(inputs[0]), n)]
    else:
        batches = [random_inputs(model, batch_size=bs, seed=seed + 100 * i + bs)
                   for i in range(samples) for bs in batch_sizes]
    names = [n for n, _, _ in input_specs(model)]
    keras_names = output_names(model)
    got, meta = run_litert(path, [dict(zip(names, b)) for b in batches], keras_names=keras_names,
                           repeats=30 if benchmark else 0)
    reference = [keras_outputs(model, b) for b in batches]
    comparison = compare_output_lists(reference, got, keras_names, atol=atol, rtol=rtol)
    exact = None
    if not comparison.passed:
        exact = exact_arithmetic_check(model, batches, got, atol=atol, rtol=rtol, model_outputs=reference)
    return LiteRTVerification(comparison=comparison, batch_sizes=sorted({int(b[0].shape[0]) for b in batches}),
                              runtime_version=meta.get("version", ""), op_counts=meta.get("op_counts", {}),
                              latency_ms=meta.get("latency_ms", {}), exact=exact)
