"""`export_int8`: the one INT8 driver of every target — fold, equalize, quantize, measure on
the target's runtime against the float Keras model, fall back, time, commit.

1. Calibration and evaluation data are checked against the model's inputs (and labels
   against its classifier output) before any work (`quantization.calibration.prepare`).
   Without evaluation data, the last share of the calibration samples is held out for it.
2. BNs are folded; cross-layer equalization (`quantization.equalize`, verified exact in
   float) is applied when asked, or by default where the target's quantizer says one range
   must serve every channel (ONNX per-tensor weights).
3. The target's quantizer (`Target.int8_quantizer`) writes the INT8 file for a candidate
   model; the driver runs it on the target's runtime over the evaluation data and measures
   it against the *original* float model (`quantization.fidelity`).
4. `equalize="auto"`: with equalization on by default, the file without it is made too
   and the better kept (equalization is exact in float, not in INT8); with it off, it is
   tried when a criterion is missed. Then, where the quantizer can rank its nodes (ONNX),
   the worst are kept in float one by one until the criteria pass or the budget is spent.
5. The float file and the INT8 file are timed side by side on the target's runtime; the
   report says when INT8 is slower (`LatencyRecord.int8_slower`).
6. The file is committed through the stage (`quantization.fidelity.commit_measured`): run
   again from its temporary name, its outputs must equal the measured ones; a missed
   criterion still writes it (exit 1, kept for inspection).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import keras
import numpy as np

from keras_bn_ext.errors import UnsupportedModelError
from keras_bn_ext.nonfinite import max_rel_err
from keras_bn_ext.compare import input_specs, output_names
from keras_bn_ext.export.target import Target, get_target
from keras_bn_ext.export.verify import run_arrays
from keras_bn_ext.folding.fold import FoldReport, fold_batchnorms
from keras_bn_ext.progress import phase
from keras_bn_ext.qat.model import is_qat_model
from keras_bn_ext.quantization import options as q
from keras_bn_ext.quantization.calibration import EVAL_BATCH, CalibrationSet, prepare
from keras_bn_ext.quantization.equalize import EqualizationReport, equalize_verified
from keras_bn_ext.quantization.fidelity import Criteria, FidelityReport, commit_measured, measure
from keras_bn_ext.stage import StageRecord

__all__ = ["CalibrationRecord", "EvaluationRecord", "FallbackStep", "Int8Options", "Int8Result", "LatencyRecord",
           "SizeRecord", "export_int8"]

EQUALIZE_SAMPLES = 64  # evaluation samples equalization is verified exact on
LATENCY_BATCH = 8
LATENCY_REPEATS = 30


@dataclass(frozen=True)
class Int8Options:
    """The INT8 options every target shares (the target's own live on its target object).

    Args:
        exclude: Names of BN layers the fold keeps (an unknown name is an error).
        equalize: "auto", "on" or "off" (see the module's step 4).
        relu6_to_relu: Let equalization replace ReLU6 by ReLU (changes the function).
        criteria: What the INT8 model must reach.
        calibration_batch_size: Samples per calibration batch.
        fallback_budget: Nodes (segments) the fallback may keep in float, worst first (0: none;
            the equalization retry of "auto" is not part of it).
        latency: When the INT8 file runs slower than the float one, keep its costliest
            quantized nodes in float one by one (at most `fallback_budget`), as long as the
            criteria still pass, and write the fastest (targets that profile their nodes: ONNX).
    """

    exclude: tuple[str, ...] = ()
    equalize: str = "auto"
    relu6_to_relu: bool = False
    criteria: Criteria = Criteria()
    calibration_batch_size: int = q.CALIBRATION_BATCH_SIZE
    fallback_budget: int = q.FALLBACK_BUDGET
    latency: bool = False

    def __post_init__(self):
        object.__setattr__(self, "exclude", tuple(self.exclude))
        q.check_int8_arguments(equalize=self.equalize, calibration_batch_size=self.calibration_batch_size)
        if not isinstance(self.fallback_budget, int) or self.fallback_budget < 0:
            raise ValueError(f"fallback_budget must be an integer >= 0. Received: fallback_budget={self.fallback_budget!r}")
        if not isinstance(self.criteria, Criteria):
            raise ValueError(f"criteria must be a quantization.fidelity.Criteria. Received: criteria={self.criteria!r}")


@dataclass
class CalibrationRecord:
    samples: int
    batch_size: int
    batches: int
    method: str  # how the target chose the activation ranges
    learned: bool = False  # a quantization-aware model's ranges: no calibration (samples, batches 0)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EvaluationRecord:
    samples: int
    source: str  # "evaluation data", or which calibration samples were held out
    labels: bool

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SizeRecord:
    float_bytes: int  # the float file the INT8 one was made from (its weights' file, for a bundle)
    int8_bytes: int

    @property
    def ratio(self) -> float:
        return round(self.int8_bytes / self.float_bytes, 4) if self.float_bytes else 0.0

    def to_dict(self) -> dict:
        return {"float": self.float_bytes, "int8": self.int8_bytes, "ratio": self.ratio}


@dataclass
class LatencyRecord:
    """Median latency of the float and the INT8 file, side by side on the target's runtime."""

    batch: int
    float_ms: float
    int8_ms: float
    device: str
    # Where INT8 is slower and the target can say (ONNX: onnxruntime's profiler): the quantized
    # nodes that cost most, with their QuantizeLinear/DequantizeLinear; {"node", "op", "ms", "qdq_ms"}.
    costly_nodes: list[dict] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return round(self.int8_ms / self.float_ms, 3) if self.float_ms else 0.0

    @property
    def int8_slower(self) -> bool:
        """INT8 ran slower than float here: it does not pay on this machine's runtime."""
        return self.int8_ms > self.float_ms

    def to_dict(self) -> dict:
        return {"batch": self.batch, "float": self.float_ms, "int8": self.int8_ms, "ratio": self.ratio,
                "int8_slower": self.int8_slower, "device": self.device, "costly_nodes": self.costly_nodes}


@dataclass
class FallbackStep:
    action: str  # "equalize" | "without_equalization" | "keep_in_float"
    nodes: list[str] | None  # keep_in_float: the nodes of one segment (a Conv and its fused Relu)
    op_types: list[str] | None
    added_db: float | None  # SQNR its quantization lost beyond its inputs (the ranking)
    score: float  # FidelityReport.score() after the step
    passed: bool

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Int8Result:
    """An INT8 export, the same fields for every target; what only one target has is `detail`."""

    target: str
    path: str
    calibration: CalibrationRecord
    evaluation: EvaluationRecord
    fold: FoldReport
    equalization: EqualizationReport | None
    equalization_max_rel_err: float | None  # the equalized Keras model against the folded one
    equalize_requested: str
    fallback: list[FallbackStep]
    fallback_budget: int
    kept_in_float: list[str]
    fidelity: FidelityReport
    float_max_rel_err: float  # the float file that was quantized, on the runtime, against the Keras model
    size: SizeRecord
    latency: LatencyRecord | None
    runtime: str
    runtime_version: str
    op_counts: dict = field(default_factory=dict)
    timings_s: dict = field(default_factory=dict)
    stage: StageRecord | None = None
    detail: object | None = None  # the target's own typed record (ONNX: formats, CPU, pre-processing)

    @property
    def passed(self) -> bool:
        return self.fidelity.passed

    def to_dict(self) -> dict:
        return {
            "target": self.target,
            "output": self.path,
            "calibration": self.calibration.to_dict(),
            "evaluation": self.evaluation.to_dict(),
            "bn_folded": self.fold.bn_folded,
            "bn_total": self.fold.bn_total,
            "equalize": self.equalize_requested,
            "equalization": self.equalization.to_dict() if self.equalization else None,
            "equalization_max_rel_err": self.equalization_max_rel_err,
            "fallback": {"budget": self.fallback_budget, "steps": [s.to_dict() for s in self.fallback]},
            "kept_in_float": self.kept_in_float,
            "fidelity": self.fidelity.to_dict(),
            "float_max_rel_err": self.float_max_rel_err,
            "size_bytes": self.size.to_dict(),
            "latency_ms": self.latency.to_dict() if self.latency else None,
            "runtime": self.runtime,
            "runtime_version": self.runtime_version,
            "op_counts": self.op_counts,
            "timings_s": self.timings_s,
            "commit": self.stage.code if self.stage else None,
            "passed": self.passed,
            self.target: self.detail.to_dict() if self.detail is not None else {},
        }


@dataclass
class _Attempt:
    float_file: Path
    int8_file: Path
    outputs: list[np.ndarray]
    fidelity: FidelityReport
    excluded: list[str]


class _Run:
    """One INT8 export's state: the data, the quantizer, the attempts."""

    def __init__(self, unit: Target, model, data: CalibrationSet, options: Int8Options, work: Path):
        self.unit, self.model, self.data, self.options = unit, model, data, options
        self.names = [n for n, _, _ in input_specs(model)]
        self.keras_names = output_names(model)
        self.quantizer = unit.int8_quantizer(model, data, options, work)
        self.runtime_version, self.op_counts = "", {}

    def outputs(self, file: Path, arrays) -> list[np.ndarray]:
        got, ran = run_arrays(self.quantizer.runner, file, arrays, input_names=self.names,
                              keras_names=self.keras_names, batch_size=EVAL_BATCH)
        self.runtime_version, self.op_counts = ran.runtime_version, ran.op_counts
        return got

    def attempt(self, candidate, tag: str, excluded: Sequence[str] = ()) -> _Attempt:
        float_file = self.quantizer.float_file(candidate, tag)
        int8_file = self.quantizer.quantize(candidate, tag, list(excluded))
        with phase(f"measure on {len(self.data.evaluation[0])} samples ({self.unit.runtime})"):
            got = self.outputs(int8_file, self.data.evaluation)
        fidelity = measure(self.data.reference, got, self.keras_names, labels=self.data.labels,
                           criteria=self.options.criteria)
        return _Attempt(float_file, int8_file, got, fidelity, list(excluded))


def _set_aside(run: _Run, attempt: _Attempt, path: Path) -> _Attempt:
    """The attempt with its INT8 file copied to `path` (a later attempt of the same tag
    overwrites the file it wrote, and what is committed must be what was measured)."""
    run.quantizer.copy(attempt.int8_file, path)
    attempt.int8_file = path
    return attempt


def _fallback(run: _Run, best: _Attempt, candidate, tag: str, budget: int, steps: list, work: Path) -> _Attempt:
    """Keep the worst-ranked nodes in float one by one (best attempt kept), where the target ranks them."""
    ranking = run.quantizer.rank(best.float_file, best.int8_file, tag)
    best = _set_aside(run, best, work / f"fallback.0{best.int8_file.name}")  # the next attempts write its name
    excluded = list(best.excluded)
    for entry in ranking[:budget]:
        excluded.extend(entry["nodes"])
        tried = run.attempt(candidate, tag, excluded)
        tried = _set_aside(run, tried, work / f"fallback.{len(excluded)}{tried.int8_file.name}")
        steps.append(FallbackStep("keep_in_float", entry["nodes"], entry["op_types"], entry["added_db"],
                                  tried.fidelity.score(), tried.fidelity.passed))
        if tried.fidelity.score() >= best.fidelity.score():
            best = tried
        if tried.fidelity.passed:
            break
    return best


def _latency(run: _Run, attempt: _Attempt) -> LatencyRecord:
    feed = [dict(zip(run.names, [a[:LATENCY_BATCH] for a in run.data.evaluation]))]
    batch = str(len(feed[0][run.names[0]]))
    with phase("time float and INT8"):
        times = {label: run.quantizer.runner.run(file, feed, keras_names=run.keras_names, repeats=LATENCY_REPEATS)
                 for label, file in (("float", attempt.float_file), ("int8", attempt.int8_file))}
    record = LatencyRecord(batch=int(batch), float_ms=times["float"].latency_ms[batch],
                           int8_ms=times["int8"].latency_ms[batch], device=times["int8"].device)
    if record.int8_slower and hasattr(run.quantizer, "costly_nodes"):
        with phase("profile the INT8 file's nodes"):
            record.costly_nodes = run.quantizer.costly_nodes(attempt.int8_file, feed[0])
    return record


def _for_latency(run: _Run, best: _Attempt, latency: LatencyRecord, candidate, tag: str, steps: list,
                 work: Path) -> tuple[_Attempt, LatencyRecord]:
    """Keep the costliest quantized nodes in float while INT8 is slower than float and the
    criteria pass; the fastest passing attempt wins."""
    best = _set_aside(run, best, work / f"latency.0{best.int8_file.name}")  # the next attempts write its name
    for _ in range(run.options.fallback_budget):
        if not latency.int8_slower or not latency.costly_nodes:
            break
        node = latency.costly_nodes[0]
        tried = run.attempt(candidate, tag, best.excluded + [node["node"]])
        tried = _set_aside(run, tried, work / f"latency.{len(tried.excluded)}{tried.int8_file.name}")
        timed = _latency(run, tried)
        steps.append(FallbackStep("keep_in_float_for_latency", [node["node"]], [node["op"]], None,
                                  tried.fidelity.score(), tried.fidelity.passed))
        if not tried.fidelity.passed or timed.int8_ms >= latency.int8_ms:
            break
        best, latency = tried, timed
    return best, latency


def export_int8(model: keras.Model, path: str | os.PathLike, calibration, *, target: str | Target = "onnx",
                eval_data=None, labels=None, options: Int8Options = Int8Options()) -> Int8Result:
    """Quantize `model` to an INT8 file of `target` at `path` and measure it on the target's
    runtime against the float model.

    Args:
        model: The float Keras model (TensorFlow backend). Never changed.
        path: The file to write.
        calibration: Real input samples: an array, a list in input order, or a dict by input
            name (samples on axis 0).
        target: "onnx", "litert", "openvino", or a `Target` (carrying its own INT8 options:
            `OnnxTarget(int8=OnnxInt8Options(per_channel=False))`).
        eval_data: Held-out real samples, the same forms; None holds out the last
            `quantization.options.HOLDOUT_FRACTION` of `calibration`.
        labels: Integer class ids of the evaluation samples, for accuracy.
        options: `Int8Options`.

    Raises:
        InputDataError, UnknownLayerError, ExportError, VerificationError, ValueError.
    """
    unit = get_target(target)
    if not unit.capabilities.int8:
        raise ValueError(f"the {unit.name} target has no INT8 export. Received: target={unit.name!r}")
    timings: dict[str, float] = {}
    start = time.perf_counter()
    # A quantization-aware model brings its own ranges and its BNs are fused already: no
    # calibration, fold, equalization or fallback; the reference is the model itself (its
    # simulation of the file).
    learned = is_qat_model(model)
    if learned and not unit.capabilities.learned_int8:
        raise UnsupportedModelError(f"'{model.name}' is a quantization-aware model, and the {unit.name} target "
                                    "cannot write an INT8 file from learned ranges")
    if learned and calibration is None:
        calibration = eval_data
    with phase("check data, float reference"):
        data = prepare(model, calibration, eval_data=eval_data, labels=labels)
    if learned:
        folded, fold_report = model, FoldReport()
    else:
        with phase("fold"):
            folded, fold_report = fold_batchnorms(model, exclude=options.exclude)
    timings["reference_and_fold"] = round(time.perf_counter() - start, 4)
    first = [a[:min(EQUALIZE_SAMPLES, len(a))] for a in data.evaluation]
    with tempfile.TemporaryDirectory(prefix=f"keras_bn_ext_{unit.name}_int8_") as work:
        work = Path(work)
        run = _Run(unit, model, data, options, work)
        start = time.perf_counter()
        equalize = "off" if learned else options.equalize
        by_default = equalize == "on" or (equalize == "auto" and run.quantizer.equalize_by_default)
        eq_report, eq_err, candidate, tag = None, None, folded, "plain"
        if by_default:
            candidate, eq_report, eq_err = equalize_verified(folded, first, relu6_to_relu=options.relu6_to_relu)
            tag = "eq"
        best = run.attempt(candidate, tag)
        steps: list[FallbackStep] = []
        if by_default and equalize == "auto":
            tried = run.attempt(folded, "plain")
            steps.append(FallbackStep("without_equalization", None, None, None, tried.fidelity.score(),
                                      tried.fidelity.passed))
            if tried.fidelity.score() > best.fidelity.score():
                best, candidate, eq_report, eq_err, tag = tried, folded, None, None, "plain"
        if not best.fidelity.passed and equalize == "auto" and not by_default:
            eq, eq_rep, err = equalize_verified(folded, first, relu6_to_relu=options.relu6_to_relu)
            if eq_rep.pairs:
                tried = run.attempt(eq, "eq")
                steps.append(FallbackStep("equalize", None, None, None, tried.fidelity.score(), tried.fidelity.passed))
                if tried.fidelity.score() > best.fidelity.score():
                    best, candidate, eq_report, eq_err, tag = tried, eq, eq_rep, err, "eq"
        if not best.fidelity.passed and options.fallback_budget and run.quantizer.can_rank:
            best = _fallback(run, best, candidate, tag, options.fallback_budget, steps, work)
        timings["quantize"] = round(time.perf_counter() - start, 4)

        start = time.perf_counter()
        float_err = max_rel_err(data.reference, run.outputs(best.float_file, data.evaluation))
        latency = _latency(run, best)
        if options.latency and best.fidelity.passed and not learned:
            best, latency = _for_latency(run, best, latency, candidate, tag, steps, work)
        first_batch = [a[:EVAL_BATCH] for a in data.evaluation]
        staged = commit_measured(
            path, lambda tmp: run.quantizer.copy(best.int8_file, Path(tmp)),
            lambda tmp: run.outputs(Path(tmp), first_batch),
            [g[:EVAL_BATCH] for g in best.outputs], best.fidelity, bundle=unit.capabilities.external_data)
        timings["verify"] = round(time.perf_counter() - start, 4)
        size = SizeRecord(run.quantizer.size(best.float_file), run.quantizer.size(Path(path)))
        detail = run.quantizer.detail(tag)
        op_counts = run.quantizer.op_counts(Path(path)) or run.op_counts  # the written file's, as last run
    return Int8Result(
        target=unit.name, path=str(path),
        calibration=CalibrationRecord(samples=0 if learned else int(len(data.calibration[0])),
                                      batch_size=options.calibration_batch_size,
                                      batches=0 if learned else -(-len(data.calibration[0])
                                                                   // options.calibration_batch_size),
                                      method=run.quantizer.method, learned=learned),
        evaluation=EvaluationRecord(samples=int(len(data.evaluation[0])), source=data.source,
                                    labels=data.labels is not None),
        fold=fold_report, equalization=eq_report, equalization_max_rel_err=eq_err, equalize_requested=equalize,
        fallback=steps, fallback_budget=options.fallback_budget, kept_in_float=best.excluded,
        fidelity=best.fidelity, float_max_rel_err=float_err, size=size, latency=latency,
        runtime=unit.runtime, runtime_version=run.runtime_version, op_counts=op_counts, timings_s=timings,
        stage=staged.record, detail=detail)
