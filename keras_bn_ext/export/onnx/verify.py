"""`verify_onnx`: an ONNX file against the Keras model it came from, on onnxruntime."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import keras
import numpy as np

from keras_bn_ext.export.onnx import _ort_worker
from keras_bn_ext.compare import (
    ComparisonReport,
    ExactArithmeticCheck,
    exact_arithmetic_check,
    check_inputs,
    compare_output_lists,
    input_specs,
    keras_outputs,
    output_names,
    random_inputs,
)
from keras_bn_ext.errors import GPUUnavailableError, VerificationError
from keras_bn_ext.export.onnx.options import FP16_ATOL, FP16_RTOL, FP32_ATOL, FP32_RTOL, PROVIDERS, OnnxOptions
from keras_bn_ext.export.options import ExportOptions
from keras_bn_ext.export.onnx.placement import Placement, parse_placement
from keras_bn_ext.latency import interleaved_timings, keras_forward

__all__ = ["verify_onnx", "VerificationReport", "run_onnxruntime"]

# onnxruntime graph rewrites seen to change outputs, with what they do wrong.
KNOWN_BAD_REWRITES = {
    "Pad_Fusion": "it fuses a zero Pad into the next MaxPool, which pads with -inf, so border "
                  "windows of negative values change",
}
_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"
# TF32 rounds matmul inputs to 10 mantissa bits (~1e-3 relative): off, or fp32
# tolerances would be meaningless on Ampere and later GPUs.
_CUDA_OPTIONS = {"use_tf32": "0"}


@dataclass
class VerificationReport:
    provider: str  # the execution provider the session really used
    requested: str  # auto | cuda | cpu
    fallback_reason: str | None
    comparison: ComparisonReport
    inputs: list[dict] = field(default_factory=list)  # {"name", "shape"} of each batch size used
    batch_sizes: list[int] = field(default_factory=list)
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    onnxruntime_version: str = ""
    # Only when the comparison failed: the same run with onnxruntime's graph
    # optimizations off. If it passes, the exported graph is right and the optimizer is not.
    unoptimized: ComparisonReport | None = None
    optimizer_culprit: str | None = None  # the onnxruntime rewrite that, turned off, fixes it
    placement: Placement | None = None  # CUDA runs only: nodes onnxruntime put on the CPU
    exact: ExactArithmeticCheck | None = None  # only when `comparison` failed

    @property
    def passed(self) -> bool:
        return self.comparison.passed or (self.exact is not None and self.exact.passed)

    @property
    def diagnosis(self) -> str | None:
        if self.unoptimized is None:
            return None
        if self.unoptimized.passed and self.optimizer_culprit:
            return (
                f"the exported graph is right (with onnxruntime's graph optimizations off it agrees to "
                f"{self.unoptimized.max_rel_err:.2g} relative); onnxruntime's '{self.optimizer_culprit}' "
                f"rewrite changes its outputs: {KNOWN_BAD_REWRITES[self.optimizer_culprit]}; create the "
                f"session with disabled_optimizers=['{self.optimizer_culprit}']"
            )
        if self.unoptimized.passed:
            return (
                "the exported graph is right: with onnxruntime's graph optimizations off it "
                f"agrees to {self.unoptimized.max_rel_err:.2g} relative; onnxruntime's optimizer "
                "changes its outputs (disable_optimizers or a lower graph_optimization_level "
                "avoids it)"
            )
        return "the outputs differ with onnxruntime's graph optimizations off too"

    def to_dict(self) -> dict:
        return {
            "provider": self.provider,
            "requested": self.requested,
            "fallback_reason": self.fallback_reason,
            "onnxruntime_version": self.onnxruntime_version,
            "batch_sizes": self.batch_sizes,
            "inputs": self.inputs,
            **self.comparison.to_dict(),
            "passed": self.passed,
            "latency_ms": self.latency_ms,
            "unoptimized_max_rel_err": self.unoptimized.max_rel_err if self.unoptimized else None,
            "diagnosis": self.diagnosis,
            "placement": self.placement.to_dict() if self.placement else None,
            "exact_arithmetic": self.exact.to_dict() if self.exact else None,
        }


def _providers(provider: str, tf32: bool = False) -> list:
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}. Received: provider={provider!r}")
    if provider == "cpu":
        return [(_CPU, {})]
    return [(_CUDA, {**_CUDA_OPTIONS, "use_tf32": "1" if tf32 else "0"}), (_CPU, {})]


def _fallback_reason(meta: dict, log: str) -> str:
    if _CUDA not in meta["available"]:
        return "this onnxruntime build has no CUDAExecutionProvider (CPU-only package)"
    preload = meta.get("preload") or {}
    suffix = f"; onnxruntime.preload_dlls() failed: {preload['error']}" if preload.get("error") else ""
    # The session is created with verbose logging: look at errors and warnings first.
    lines = [line for line in log.splitlines() if re.search(r"cuda|CUDA|libcu|GPU", line)]
    lines = ([line for line in lines if "with error:" in line]
             + [line for line in lines if re.search(r"\[[EW]:onnxruntime", line)] + lines)
    if lines:
        # onnxruntime's log: "... Failed to load library libonnxruntime_providers_cuda.so
        # with error: libcublasLt.so.13: cannot open shared object file ..."
        text = lines[0]
        if "with error:" in text:
            library = re.search(r"library (\S+)", text)
            name = os.path.basename(library.group(1)) if library else "the CUDA provider"
            text = f"loading {name} failed: " + text.split("with error:", 1)[1].strip()
        else:
            text = re.sub(r"^.*?\] ", "", text).strip()
        text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # onnxruntime colours its errors
        return f"CUDA could not be used: {text[:300]}{suffix}"
    return f"CUDA could not be used (onnxruntime fell back to the CPU without saying why){suffix}"


def run_onnxruntime(
    onnx_path: str | os.PathLike,
    batches: Sequence[Mapping[str, np.ndarray]],
    *,
    provider: str = "auto",
    repeats: int = 0,
    threads: int | None = None,
    profile: int = 0,
    session: Mapping | None = None,
) -> tuple[list[list[np.ndarray]], dict]:
    """Run the ONNX model on each batch in a child process (see _ort_worker).

    `profile`: also run the first batch this many times under onnxruntime's profiler (the
    metadata's `node_ms`: mean milliseconds per node). `session`: how the session is made,
    `{"optimizations": False}` turns onnxruntime's graph optimizations off,
    `{"disabled_optimizers": [...]}` turns named ones off, `{"tf32": True}` lets CUDA use
    TF32 (only to measure what it costs: verification keeps it off).

    Returns the outputs per batch (in the ONNX graph's output order) and the worker's
    metadata (provider used, available providers, latencies, its log).
    """
    session = dict(session or {})
    optimizations = session.get("optimizations", True)
    disabled_optimizers = session.get("disabled_optimizers", ())
    tf32 = session.get("tf32", False)
    input_names = list(batches[0])
    meta = {
        "model": str(Path(onnx_path).resolve()),
        "providers": _providers(provider, tf32),
        "input_names": input_names,
        "batches": len(batches),
        "repeats": repeats,
        "threads": threads,
        "optimizations": optimizations,
        "disabled_optimizers": list(disabled_optimizers),
        "profile": int(profile),
    }
    arrays = {f"b{i}__{name}": np.ascontiguousarray(b[name]) for i, b in enumerate(batches) for name in input_names}
    with tempfile.TemporaryDirectory(prefix="keras_bn_ext_ort_") as tmp:
        request, response = os.path.join(tmp, "request.npz"), os.path.join(tmp, "response.npz")
        np.savez(request, __meta__=np.array(json.dumps(meta)), **arrays)
        proc = subprocess.run(
            [sys.executable, _ort_worker.__file__, request, response],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise VerificationError(f"onnxruntime failed on {onnx_path}: {last[:400]}")
        with np.load(response, allow_pickle=False) as res:
            out_meta = json.loads(str(res["__meta__"]))
            n_out = len(out_meta["output_names"])
            outputs = [[res[f"b{i}__o{j}"] for j in range(n_out)] for i in range(len(batches))]
    out_meta["log"] = proc.stderr
    return outputs, out_meta


def in_keras_order(got, meta: dict, keras_names: list) -> list:
    """Outputs per batch reordered from the ONNX session's order to Keras's."""
    if meta["output_names"] == keras_names:
        return got
    order = {n: i for i, n in enumerate(meta["output_names"])}
    if set(order) != set(keras_names):
        raise VerificationError(
            f"ONNX outputs {meta['output_names']} do not match the Keras outputs {keras_names}"
        )
    return [[b[order[n]] for n in keras_names] for b in got]


@contextmanager
def _tf32_off():
    """TF32 off for the Keras reference (float32 on every GPU), restored afterwards."""
    if keras.backend.backend() != "tensorflow":
        yield
        return
    import tensorflow as tf

    was = tf.config.experimental.tensor_float_32_execution_enabled()
    tf.config.experimental.enable_tensor_float_32_execution(False)
    try:
        yield
    finally:
        tf.config.experimental.enable_tensor_float_32_execution(was)


def _keras_latency_ms(model: keras.Model, batch: list[np.ndarray], repeats: int) -> float:
    forward = keras_forward(model)
    return interleaved_timings({"keras": lambda: forward(batch)}, repeats=repeats)["keras"].median_ms


def holds_float16(onnx_path) -> bool:
    """Whether the ONNX file computes in float16 (any float16 initializer)."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    return any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)


def verify_onnx(
    model: keras.Model,
    onnx_path: str | os.PathLike,
    *,
    options: ExportOptions | None = None,
    onnx: OnnxOptions | None = None,
    seed: int = 0,
    benchmark_repeats: int = 30,
) -> VerificationReport:
    """Compare the ONNX model's outputs on onnxruntime with the Keras model's.

    The reference is `model` in inference mode in float32 with TF32 off. onnxruntime
    runs in a child process (CUDA 12 TensorFlow and CUDA 13 onnxruntime-gpu do not
    share a process), with CUDA first (`use_tf32=0`) then the CPU for
    `provider="auto"`; the provider that really ran is read from the session.

    Args:
        model: The Keras model the file was exported from (folded or not).
        onnx_path: The .onnx file.
        options: What every target's verification reads (`ExportOptions`): `inputs`
            (one array per model input, real data) or `samples` seeded random batches
            of each size in `batch_sizes`; `atol`, `rtol` (an output passes when
            max|a-b| <= atol + rtol * max|reference|; None: the float32 defaults, or
            the float16 ones when the file holds float16 weights, read from the file
            itself); `benchmark` (also time Keras's `tf.function` and onnxruntime at
            each batch size). Its fold/exclude/fp16 are the export's, unused here.
        onnx: The ONNX target's options (`OnnxOptions`): `provider` ("auto", "cuda"
            or "cpu"); `require_gpu` (raise GPUUnavailableError when the CPU ran
            instead of CUDA); `require_all_gpu` (also when onnxruntime placed any
            compute node on the CPU inside the CUDA session, shape computations it
            keeps there on purpose excepted).
        seed: Seed of the random batches.
        benchmark_repeats: Timed runs per batch size with `options.benchmark`.
    """
    options = options if options is not None else ExportOptions()
    onnx = onnx if onnx is not None else OnnxOptions()
    inputs, samples, batch_sizes, benchmark = options.inputs, options.samples, options.batch_sizes, options.benchmark
    atol, rtol = options.atol, options.rtol
    provider, require_gpu, require_all_gpu = onnx.provider, onnx.require_gpu, onnx.require_all_gpu
    if atol is None or rtol is None:
        half = holds_float16(onnx_path)
        atol = atol if atol is not None else (FP16_ATOL if half else FP32_ATOL)
        rtol = rtol if rtol is not None else (FP16_RTOL if half else FP32_RTOL)
    if inputs is not None:
        check_inputs(model, inputs)
        batches = [list(inputs)]
    else:
        batches = [
            random_inputs(model, batch_size=bs, seed=seed + 100 * i + bs)
            for i in range(samples)
            for bs in batch_sizes
        ]
    specs = input_specs(model)
    names = [name for name, _, _ in specs]
    feeds = [dict(zip(names, b)) for b in batches]
    got, meta = run_onnxruntime(
        onnx_path, feeds, provider=provider, repeats=benchmark_repeats if benchmark else 0
    )
    keras_names = output_names(model)
    got = in_keras_order(got, meta, keras_names)
    with _tf32_off():
        reference = [keras_outputs(model, b) for b in batches]
    comparison = compare_output_lists(reference, got, keras_names, atol=atol, rtol=rtol)
    unoptimized, culprit, exact = None, None, None
    if not comparison.passed:
        # Two correct float32 computations of an ill-conditioned model can differ beyond
        # the tolerance: judge the ONNX outputs against the model in float64 first.
        with _tf32_off():
            exact = exact_arithmetic_check(model, batches, got, atol=atol, rtol=rtol, model_outputs=reference)
    if not comparison.passed and not exact.passed:
        # Tell a wrong graph from onnxruntime's optimizer rewriting a right one.
        def rerun(**session):
            out, out_meta = run_onnxruntime(onnx_path, feeds, provider=provider, session=session)
            return compare_output_lists(reference, in_keras_order(out, out_meta, keras_names), keras_names,
                                        atol=atol, rtol=rtol)

        unoptimized = rerun(optimizations=False)
        if unoptimized.passed:
            culprit = next((rule for rule in KNOWN_BAD_REWRITES
                            if rerun(disabled_optimizers=[rule]).passed), None)

    used = meta["provider"]
    fallback = None
    if provider != "cpu" and used != _CUDA:
        fallback = _fallback_reason(meta, meta["log"])
        if require_gpu or require_all_gpu:
            raise GPUUnavailableError(f"a GPU run was required: onnxruntime ran on {used}; {fallback}")
    placement = parse_placement(meta["log"]) if used == _CUDA else None
    if require_all_gpu and used == _CUDA:
        if placement is None:
            raise GPUUnavailableError("every node on the GPU was required, but onnxruntime's log lists no node placements")
        if placement.cpu_compute_nodes:
            first = placement.cpu_compute_nodes[0]
            raise GPUUnavailableError(
                f"every node on the GPU was required: {len(placement.cpu_compute_nodes)} compute node(s) ran on "
                f"the CPU, e.g. {first.op_type} '{first.name}' ({first.reason})"
            )
    sizes = sorted({int(b[0].shape[0]) for b in batches})
    latency = {}
    if benchmark:
        by_size = {int(b[0].shape[0]): b for b in batches}
        for bs in sizes:
            latency[str(bs)] = {
                "keras_tf_function": _keras_latency_ms(model, by_size[bs], benchmark_repeats),
                "onnxruntime": meta["latency_ms"].get(str(bs)),
            }
    return VerificationReport(
        provider=used,
        requested=provider,
        fallback_reason=fallback,
        comparison=comparison,
        inputs=[{"name": n, "shape": [None if d is None else int(d) for d in s]} for n, s, _ in specs],
        batch_sizes=sizes,
        latency_ms=latency,
        onnxruntime_version=meta.get("version", ""),
        unoptimized=unoptimized,
        optimizer_culprit=culprit,
        placement=placement,
        exact=exact,
    )
