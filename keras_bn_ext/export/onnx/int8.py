"""`export_int8`: fold, equalize, export, quantize with onnxruntime, and prove the accuracy.

1. Calibration and evaluation data are checked against the model's inputs (and labels
   against its classifier output) before any work. Without evaluation data, the last
   share of the calibration samples is held out for it (and not calibrated on).
2. BNs are folded; cross-layer equalization (`quantization.equalize`) is applied when
   asked (by default with per-tensor weights) and verified exact against the model in
   float (<= 1e-5, like a fold).
3. The float graph is exported with tf2onnx, passed through onnxruntime's own
   pre-quantization step (`quant_pre_process`: a zero Pad moved into its Conv, so no Pad
   runs in float between a DequantizeLinear and a QuantizeLinear) and quantized by
   onnxruntime (QDQ, u8 activations, s8 weights), calibrated batch by batch;
   `reduce_range` follows the CPU the file is for (`quantization.cpu`).
4. The INT8 file runs on onnxruntime's CPU provider over the evaluation data and is
   compared with the *original* float Keras model (`quantization.fidelity`).
   With equalize="auto" and per-tensor weights, the file without equalization is made
   too and the better one kept (equalization is exact in float, not in INT8).
5. When a criterion is missed: equalization is tried if "auto" left it off, then the quantized
   nodes are ranked by the SQNR they lose beyond their inputs and the worst kept in float
   one by one (`nodes_to_exclude`) until the criteria pass or the budget is spent.
6. The file is written through a temporary name, run once more from there (its outputs
   must equal the measured ones), then renamed: also when a criterion is missed (exit 1,
   kept for inspection, as the float export does).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import keras
import numpy as np

from keras_bn_ext import nonfinite

from keras_bn_ext.compare import input_specs, output_names
from keras_bn_ext.data import array_batches
from keras_bn_ext.errors import VerificationError
from keras_bn_ext.export.onnx import options as onnx_options
from keras_bn_ext.export.onnx.convert import export_onnx, file_op_counts
from keras_bn_ext.export.onnx.quantize import preprocess_onnx, quantize_onnx, rank_nodes
from keras_bn_ext.export.onnx.verify import run_onnxruntime
from keras_bn_ext.folding.fold import FoldReport, fold_batchnorms
from keras_bn_ext.progress import phase
from keras_bn_ext.progress import steps as counted_steps
from keras_bn_ext.stage import StageRecord
from keras_bn_ext.quantization import options
from keras_bn_ext.quantization.cpu import CpuTarget, cpu_target, detect_cpu
from keras_bn_ext.quantization.equalize import EqualizationReport, equalize_verified
from keras_bn_ext.quantization.calibration import EVAL_BATCH, prepare
from keras_bn_ext.quantization.fidelity import Criteria, FidelityReport, commit_measured, measure

__all__ = ["Int8Result", "export_int8"]

_RANK_SAMPLES = 256  # evaluation samples the fallback ranks nodes on
# onnxruntime's pre-step rewrites float arithmetic (a Pad into a Conv, constants folded): its
# graph must give the exported graph's outputs to float32 rounding, scaled to the output.
_PREPROCESS_RTOL = 1e-5


@dataclass
class FallbackStep:
    action: str  # "equalize" | "without_equalization" | "keep_in_float"
    nodes: list[str] | None  # keep_in_float: the ONNX nodes of one segment (a Conv and its fused Relu)
    op_types: list[str] | None
    added_db: float | None  # SQNR its quantization lost beyond its inputs (the ranking)
    score: float  # FidelityReport.score() after the step
    passed: bool


@dataclass
class Preprocess:
    """What onnxruntime's pre-quantization step did to the float graph that was quantized."""

    code: str  # "applied" | "rejected_mismatch" | "skipped_external_data" | "off"
    ops_before: dict
    ops_after: dict
    max_rel_err: float | None = None  # the pre-processed float graph against the exported one

    @property
    def removed(self) -> dict:
        """Op types the step removed (or merged into others), with how many."""
        return {op: n - self.ops_after.get(op, 0) for op, n in self.ops_before.items()
                if n > self.ops_after.get(op, 0)}

    def to_dict(self) -> dict:
        return {"code": self.code, "removed": self.removed, "max_rel_err": self.max_rel_err,
                "ops_before": self.ops_before, "ops_after": self.ops_after}


@dataclass
class Int8Result:
    path: str
    calibration: dict  # {"samples", "batch_size", "batches", "method", "source"}
    evaluation: dict  # {"samples", "source", "labels"}
    per_channel: bool
    reduce_range: bool
    target_cpu: CpuTarget
    fold: FoldReport
    equalization: EqualizationReport | None
    equalize_requested: str
    kept_in_float: list[str]
    fallback: list[FallbackStep]
    fallback_budget: int
    fidelity: FidelityReport
    float_onnx_max_rel_err: float  # the float ONNX graph that was quantized against the original Keras model
    equalization_max_rel_err: float | None  # the equalized Keras model against the folded one
    size_bytes: dict  # {"float", "int8", "ratio"}
    onnxruntime_version: str
    latency_ms: dict = field(default_factory=dict)
    timings_s: dict = field(default_factory=dict)
    stage: StageRecord | None = None  # what the verify-and-commit stage did
    opset: int = onnx_options.DEFAULT_OPSET
    op_counts: dict = field(default_factory=dict)
    preprocess: Preprocess | None = None

    @property
    def passed(self) -> bool:
        return self.fidelity.passed

    @property
    def measured_on_cpu(self) -> str:
        """The CPU the fidelity was measured on (this machine's onnxruntime): where it is not
        the target (8-bit weights for VNNI measured on AVX2), the numbers may differ there."""
        return detect_cpu().name

    def to_dict(self) -> dict:
        return {
            "output": self.path,
            "format": "QDQ",
            "activation_type": "uint8",
            "weight_type": "int8",
            "per_channel": self.per_channel,
            "reduce_range": self.reduce_range,
            "target_cpu": self.target_cpu.to_dict(),
            "measured_on_cpu": self.measured_on_cpu,
            "calibration": self.calibration,
            "evaluation": self.evaluation,
            "equalize": self.equalize_requested,
            "equalization": self.equalization.to_dict() if self.equalization else None,
            "equalization_max_rel_err": self.equalization_max_rel_err,
            "kept_in_float": self.kept_in_float,
            "fallback": {"budget": self.fallback_budget, "steps": [vars(s) for s in self.fallback]},
            "fidelity": self.fidelity.to_dict(),
            "float_onnx_max_rel_err": self.float_onnx_max_rel_err,
            "size_bytes": self.size_bytes,
            "onnxruntime_version": self.onnxruntime_version,
            "opset": self.opset,
            "op_counts": self.op_counts,
            "preprocess": self.preprocess.to_dict() if self.preprocess else None,
            "bn_folded": self.fold.bn_folded,
            "bn_total": self.fold.bn_total,
            "latency_ms": self.latency_ms,
            "timings_s": self.timings_s,
            "commit": self.stage.code if self.stage else None,
            "passed": self.passed,
        }


def _run_file(path, arrays, names, model) -> tuple[list[np.ndarray], dict]:
    feeds = [dict(zip(names, b)) for b in array_batches(arrays, EVAL_BATCH)]
    got, meta = run_onnxruntime(path, feeds, provider="cpu")
    order = {n: i for i, n in enumerate(meta["output_names"])}
    keras_names = output_names(model)
    if set(order) != set(keras_names):
        raise VerificationError(f"ONNX outputs {meta['output_names']} do not match the Keras outputs {keras_names}")
    return [np.concatenate([b[order[n]] for b in got]) for n in keras_names], meta


def _max_rel(reference, got) -> float:
    """max|g - r| / max|r| over outputs; inf when NaN/inf appear where they should not."""
    worst = 0.0
    for r, g in zip(reference, got):
        d = nonfinite.differences(r, g)
        if d.mismatches:
            return float("inf")
        worst = max(worst, d.max_abs / (d.reference_max or 1.0))
    return worst


def export_int8(
    model: keras.Model,
    path: str | os.PathLike,
    calibration,
    *,
    eval_data=None,
    labels=None,
    exclude: Sequence[str] = (),
    opset: int = onnx_options.DEFAULT_OPSET,
    batch_size: int | None = None,
    per_channel: bool = True,
    method: str = options.DEFAULT_METHOD,
    target_cpu: str = "auto",
    equalize: str = "auto",
    relu6_to_relu: bool = False,
    criteria: Criteria = Criteria(),
    fallback_budget: int = options.FALLBACK_BUDGET,
    calibration_batch_size: int = options.CALIBRATION_BATCH_SIZE,
    benchmark: bool = False,
    preprocess: bool = True,
) -> Int8Result:
    """Quantize `model` to an INT8 ONNX file at `path` and measure it against the float model.

    Args:
        model: The float Keras model (TensorFlow backend). Never changed.
        path: The .onnx file to write.
        calibration: Real input samples: an array, a list in input order, or a dict by
            input name (samples on axis 0).
        eval_data: Held-out real samples, the same forms; None holds out the last
            `options.HOLDOUT_FRACTION` of `calibration`.
        labels: Integer class ids of the evaluation samples (of the calibration samples
            when the evaluation is held out of them), for accuracy.
        per_channel: One weight scale per output channel (else one per tensor).
        method: Calibration method, one of `options.METHODS`.
        target_cpu: The CPU the file is for ("auto": this one; see `quantization.cpu`).
        equalize: "auto" (on with per-tensor weights), "on" or "off".
        relu6_to_relu: Let equalization replace ReLU6 by ReLU (changes the function).
        criteria: What the INT8 model must reach (`quantization.fidelity.Criteria`).
        fallback_budget: Segments of nodes (a Conv and its fused activation) the fallback may
            keep in float, worst first (0: no fallback).
        benchmark: Also time the float and INT8 files on onnxruntime's CPU provider.
        preprocess: Pass the float graph through onnxruntime's `quant_pre_process` before
            quantizing (skipped for a graph with external data, which it cannot write).

    Raises:
        InputDataError, ExportError, VerificationError, ValueError (an argument).
    """
    if method not in options.METHODS:
        raise ValueError(f"method must be one of {options.METHODS}. Received: method={method!r}")
    options.check_int8_arguments(equalize=equalize, calibration_batch_size=calibration_batch_size)
    if fallback_budget < 0:
        raise ValueError(f"fallback_budget must be >= 0. Received: fallback_budget={fallback_budget}")
    target = cpu_target(target_cpu)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    with phase("check data, float reference"):
        data = prepare(model, calibration, eval_data=eval_data, labels=labels)
    calib, evaluation, labels, reference = data.calibration, data.evaluation, data.labels, data.reference
    timings["reference"] = round(time.perf_counter() - start, 4)

    start = time.perf_counter()
    with phase("fold"):
        folded, fold_report = fold_batchnorms(model, exclude=exclude)
    timings["fold"] = round(time.perf_counter() - start, 4)
    names = [n for n, _, _ in input_specs(model)]
    use_equalize = equalize == "on" or (equalize == "auto" and not per_channel)
    first = [a[: min(64, len(a))] for a in evaluation]

    def equalized():
        return equalize_verified(folded, first, relu6_to_relu=relu6_to_relu)

    with tempfile.TemporaryDirectory(prefix="keras_bn_ext_int8_") as work:
        work = Path(work)
        calib_npz, rank_npz = work / "calibration.npz", work / "rank.npz"
        np.savez(calib_npz, **dict(zip(names, calib)))
        np.savez(rank_npz, **{n: a[:_RANK_SAMPLES] for n, a in zip(names, evaluation)})
        calibration_info = data.info(calibration_batch_size, method)

        prepared: dict[str, Preprocess] = {}

        def float_graph(candidate, tag: str) -> Path:
            """The float graph that is quantized: exported, then onnxruntime's pre-step."""
            exported, pre = work / f"{tag}.float.onnx", work / f"{tag}.pre.onnx"
            if tag in prepared:
                return pre if prepared[tag].code == "applied" else exported
            with phase("convert (tf2onnx)"):
                report = export_onnx(candidate, exported, fold=False, opset=opset, batch_size=batch_size)
            if not preprocess:
                prepared[tag] = Preprocess("off", {}, {})
            elif (work / f"{exported.name}.data").exists():  # onnxruntime's step writes one protobuf
                prepared[tag] = Preprocess("skipped_external_data", {}, {})
            else:
                with phase("onnxruntime pre-quantization"):
                    preprocess_onnx(exported, pre)
                    err = _max_rel(_run_file(exported, first, names, model)[0], _run_file(pre, first, names, model)[0])
                code = "applied" if err <= _PREPROCESS_RTOL else "rejected_mismatch"
                prepared[tag] = Preprocess(code, report.op_counts, file_op_counts(pre), err)
            return float_graph(candidate, tag)

        def attempt(candidate, tag: str, excluded: Sequence[str], cache):
            float_path, int8_path = float_graph(candidate, tag), work / f"{tag}.int8.onnx"
            calibrated = Path(cache).exists()  # the ranges of an earlier attempt are reused
            with counted_steps("quantize (calibration cached)" if calibrated else "calibrate and quantize",
                       0 if calibrated else calibration_info["batches"]) as advance:
                meta = quantize_onnx(float_path, int8_path, calib_npz, names, per_channel=per_channel,
                                     reduce_range=target.reduce_range, method=method,
                                     batch_size=calibration_batch_size, nodes_to_exclude=excluded, cache=cache,
                                     on_batch=advance)
            with phase(f"measure on {len(evaluation[0])} samples"):
                got, _ = _run_file(int8_path, evaluation, names, model)
            fidelity = measure(reference, got, output_names(model), labels=labels, criteria=criteria)
            return float_path, int8_path, got, fidelity, meta

        start = time.perf_counter()
        eq_report, eq_err, candidate = None, None, folded
        if use_equalize:
            candidate, eq_report, eq_err = equalized()
        tag = "eq" if use_equalize else "plain"
        float_path, int8_path, got, fidelity, meta = attempt(candidate, tag, [], work / f"{tag}.cache.json")
        steps: list[FallbackStep] = []
        if use_equalize and equalize == "auto":
            # Equalization is exact in float but moves rounding in INT8: on a net whose
            # ranges were even already it can cost a sample or two. "auto" keeps the better.
            tried = attempt(folded, "plain", [], work / "plain.cache.json")
            steps.append(FallbackStep("without_equalization", None, None, None, tried[3].score(), tried[3].passed))
            if tried[3].score() > fidelity.score():
                candidate, eq_report, eq_err, tag = folded, None, None, "plain"
                float_path, int8_path, got, fidelity, meta = tried
        excluded: list[str] = []
        if not fidelity.passed and equalize == "auto" and not use_equalize:
            eq, eq_rep, err = equalized()
            if eq_rep.pairs:
                tried = attempt(eq, "eq", [], work / "eq.cache.json")
                steps.append(FallbackStep("equalize", None, None, None, tried[3].score(), tried[3].passed))
                if tried[3].score() > fidelity.score():
                    candidate, eq_report, eq_err, tag = eq, eq_rep, err, "eq"
                    float_path, int8_path, got, fidelity, meta = tried
        if not fidelity.passed and fallback_budget:
            ranking = rank_nodes(float_path, int8_path, rank_npz, names, batch_size=EVAL_BATCH, workdir=work)
            best = (float_path, int8_path, got, fidelity, meta, list(excluded))
            for entry in ranking[:fallback_budget]:
                excluded.extend(entry["nodes"])
                tried = attempt(candidate, tag, excluded, work / f"{tag}.cache.json")
                # Each attempt writes the same name: keep the best one's file aside.
                kept = work / f"best.{len(excluded)}.int8.onnx"
                shutil.copyfile(tried[1], kept)
                steps.append(FallbackStep("keep_in_float", entry["nodes"], entry["op_types"], entry["added_db"],
                                          tried[3].score(), tried[3].passed))
                if tried[3].score() >= best[3].score():
                    best = (tried[0], kept, tried[2], tried[3], tried[4], list(excluded))
                if tried[3].passed:
                    break
            float_path, int8_path, got, fidelity, meta, excluded = best
        timings["quantize"] = round(time.perf_counter() - start, 4)

        start = time.perf_counter()
        float_got, _ = _run_file(float_path, evaluation, names, model)
        float_err = _max_rel(reference, float_got)
        latency = {}
        if benchmark:
            feed = [dict(zip(names, [a[:8] for a in evaluation]))]
            for label, file in (("float", float_path), ("int8", int8_path)):
                _, m = run_onnxruntime(file, feed, provider="cpu", repeats=30)
                latency[label] = m["latency_ms"]
        staged = commit_measured(
            path, lambda tmp: shutil.copyfile(int8_path, tmp),
            lambda tmp: _run_file(tmp, [a[:EVAL_BATCH] for a in evaluation], names, model)[0],
            [g[:EVAL_BATCH] for g in got], fidelity)
        timings["verify"] = round(time.perf_counter() - start, 4)
        sizes = {"float": os.path.getsize(work / f"{tag}.float.onnx"), "int8": os.path.getsize(path)}
        sizes["ratio"] = round(sizes["int8"] / sizes["float"], 4)
    return Int8Result(
        path=str(path), calibration=calibration_info,
        evaluation=data.evaluation_info(),
        per_channel=per_channel, reduce_range=target.reduce_range, target_cpu=target, fold=fold_report,
        equalization=eq_report, equalize_requested=equalize, kept_in_float=excluded, fallback=steps,
        fallback_budget=fallback_budget, fidelity=fidelity, float_onnx_max_rel_err=float_err,
        equalization_max_rel_err=eq_err, size_bytes=sizes, onnxruntime_version=meta.get("version", ""),
        latency_ms=latency, timings_s=timings, stage=staged.record, opset=opset, op_counts=file_op_counts(path),
        preprocess=prepared[tag],
    )
