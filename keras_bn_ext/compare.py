"""Compare two models (or a model and any runtime) output by output on the same inputs."""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass, field
from typing import Sequence

import keras
import numpy as np

from keras_bn_ext import _keras_internals as internals
from keras_bn_ext import nonfinite
from keras_bn_ext.errors import InputDataError, RebuildMismatchError, UnsupportedModelError, VerificationError

__all__ = [
    "OutputError",
    "ComparisonReport",
    "compare_models",
    "compare_output_lists",
    "random_inputs",
    "input_specs",
    "output_names",
    "ExactArithmeticCheck",
    "REFERENCE_CODES",
    "FLOAT32_MODEL_BOUND",
    "exact_arithmetic_check",
    "fold_exact_check",
]

# Unknown non-batch dimensions of an input (e.g. (None, None, 3) images) are drawn at this size.
DEFAULT_FREE_DIM = 32


@dataclass
class OutputError:
    """Errors of one output: max|a-b|, max|a-b| / max|reference|, mean|a-b| (over the
    elements where both are finite), and `nonfinite_mismatches`: elements where the
    candidate has NaN or inf and the reference not, or the other way round, or another
    kind (any one fails the output; `keras_bn_ext.nonfinite`)."""

    name: str
    max_abs_err: float
    max_rel_err: float
    mean_abs_err: float
    passed: bool
    nonfinite_mismatches: int = 0
    reference_nonfinite: int = 0  # NaN/inf elements of the reference (the candidate must match them)


@dataclass
class ComparisonReport:
    outputs: list[OutputError] = field(default_factory=list)
    atol: float = 0.0
    rtol: float = 0.0
    batches: int = 0

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    @property
    def max_abs_err(self) -> float:
        return max((o.max_abs_err for o in self.outputs), default=0.0)

    @property
    def max_rel_err(self) -> float:
        return max((o.max_rel_err for o in self.outputs), default=0.0)

    @property
    def nonfinite_mismatches(self) -> int:
        return sum(o.nonfinite_mismatches for o in self.outputs)

    def to_dict(self) -> dict:
        return {
            "outputs": [asdict(o) for o in self.outputs],
            "atol": self.atol,
            "rtol": self.rtol,
            "batches": self.batches,
            "max_abs_err": self.max_abs_err,
            "max_rel_err": self.max_rel_err,
            "nonfinite_mismatches": self.nonfinite_mismatches,
            "passed": self.passed,
        }


def input_specs(model: keras.Model) -> list[tuple[str, tuple, str]]:
    """(name, shape with None for unknown dims, dtype) of each model input, in order."""
    specs = []
    for tensor in model.inputs:
        layer = internals.producer_of(tensor)
        specs.append((layer.name, tuple(tensor.shape), keras.backend.standardize_dtype(tensor.dtype)))
    return specs


def output_names(model: keras.Model) -> list[str]:
    """Names of the model's outputs in flattened order: dict keys (sorted, as keras.tree
    flattens them) for dict outputs, else the producing layers' names."""
    graph = internals.functional_graph(model) or model  # a Sequential's graph
    struct = internals.outputs_struct(graph)
    if isinstance(struct, dict):
        return sorted(struct)
    return list(graph.output_names)


def random_inputs(model: keras.Model, *, batch_size: int, seed: int) -> list[np.ndarray]:
    """Seeded random inputs shaped from the model: N(0, 1) floats, small non-negative ints."""
    rng = np.random.default_rng(seed)
    arrays = []
    for _, shape, dtype in input_specs(model):
        full = (batch_size,) + tuple(DEFAULT_FREE_DIM if d is None else d for d in shape[1:])
        if "int" in dtype:
            arrays.append(rng.integers(0, 10, size=full).astype(dtype))
        elif dtype == "bool":
            arrays.append(rng.integers(0, 2, size=full).astype(bool))
        else:
            arrays.append(rng.standard_normal(full).astype(dtype))
    return arrays


def shape_fits(expected: tuple, actual: tuple) -> bool:
    """Same rank, and every known dimension of `expected` equal in `actual`."""
    return len(actual) == len(expected) and all(d is None or d == a for d, a in zip(expected, actual))


def check_inputs(model: keras.Model, arrays: Sequence[np.ndarray]) -> None:
    """Raise InputDataError when arrays do not fit the model's inputs (count, rank, sizes)."""
    specs = input_specs(model)
    if len(arrays) != len(specs):
        raise InputDataError(f"model takes {len(specs)} inputs, got {len(arrays)} arrays")
    for (name, shape, _), array in zip(specs, arrays):
        if not shape_fits(shape, tuple(array.shape)):
            raise InputDataError(
                f"input '{name}' expects shape {shape}, got {tuple(array.shape)}"
            )


def keras_outputs(model: keras.Model, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Inference outputs of a Keras model as numpy arrays, flattened like output_names().

    On TensorFlow the model runs as a `tf.function` (one per model, kept while the model
    lives): TensorFlow's eager mode keeps a high-water mark of every activation it made
    (ResNet152 at batch 8: +2.4 GB of RSS eagerly, +0.17 GB as a graph), which made
    verification the peak of an export. Models whose call cannot be traced run eagerly.
    """
    x = list(arrays) if len(arrays) > 1 else arrays[0]
    out = _forward(model)(x)
    return [np.asarray(keras.ops.convert_to_numpy(o)) for o in keras.tree.flatten(out)]


_FORWARD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _RetracingFilter:
    """Drops TensorFlow's "N out of the last M calls to ... triggered tf.function retracing"
    for this module's inference graphs only: one graph per model is the design (each model is
    traced once and cached), and TensorFlow counts the traces of every model's graph together
    because they share one Python function."""

    def filter(self, record) -> bool:
        message = record.getMessage()
        return not ("keras_bn_ext_inference" in message and "retracing" in message)


def _quiet_retracing_warning() -> None:
    import logging

    logger = logging.getLogger("tensorflow")
    if not any(isinstance(f, _RetracingFilter) for f in logger.filters):
        logger.addFilter(_RetracingFilter())


# The graph of a model must compute what the model computes eagerly, to float32 rounding: it is
# checked once per model on one sample. TensorFlow 2.21's oneDNN graph rewrites (its remapper's
# fused convolutions, on CPUs with AVX-512) were measured giving a folded KerasHub CSPNet
# outputs 4.8e-2 off its eager run (3e-7 eagerly, and 3e-7 with TF_ENABLE_ONEDNN_OPTS=0). A
# model whose graph misses this runs eagerly; `GRAPH_REFUSED` names it, with the error.
GRAPH_RTOL = 1e-4
GRAPH_REFUSED: dict[str, float] = {}


_GRAPH_FAILED = object()


def _graph_error(graph, model, x):
    """max relative difference of the graph against eager execution on the first sample;
    `_GRAPH_FAILED` when the graph cannot run (a call() that only runs eagerly), None when
    the eager run cannot (the graph is then used unchecked, as before the check existed)."""
    one = keras.tree.map_structure(lambda a: np.asarray(a)[:1], x)
    try:
        got = [keras.ops.convert_to_numpy(o) for o in keras.tree.flatten(graph(one))]
    except Exception:  # noqa: BLE001 - numpy calls, Python state
        return _GRAPH_FAILED
    try:
        want = [keras.ops.convert_to_numpy(o) for o in keras.tree.flatten(model(one, training=False))]
    except Exception:  # noqa: BLE001
        return None
    return nonfinite.max_rel_err(want, got)


def _forward(model):
    eager = lambda x: model(x, training=False)  # noqa: E731
    if keras.backend.backend() != "tensorflow":
        return eager
    try:
        fn = _FORWARD.get(model)
    except TypeError:  # not weak-referenceable
        return eager
    if fn is None:
        import tensorflow as tf

        ref = weakref.ref(model)  # the cache must not keep the model alive

        def keras_bn_ext_inference(x):
            return ref()(x, training=False)

        _quiet_retracing_warning()
        graph = tf.function(keras_bn_ext_inference, reduce_retracing=True, autograph=False)

        checked = False

        def fn(x):
            nonlocal graph, checked
            if graph is not None and not checked:
                checked = True
                err = _graph_error(graph, ref(), x)
                if err is _GRAPH_FAILED:
                    graph, err = None, None
                if err is not None and not err <= GRAPH_RTOL:
                    GRAPH_REFUSED[ref().name] = err
                    graph = None
            if graph is not None:
                try:
                    return graph(x)
                except Exception:  # noqa: BLE001 - a call() that only runs eagerly (numpy, Python state)
                    graph = None
            return ref()(x, training=False)

        _FORWARD[model] = fn
    return fn


def _accumulate(stats: dict, name: str, ref: np.ndarray, got: np.ndarray) -> None:
    ref = np.asarray(ref, np.float64)
    got = np.asarray(got, np.float64)
    if ref.shape != got.shape:
        raise VerificationError(f"output '{name}' has shape {got.shape}, expected {ref.shape}")
    d = nonfinite.differences(ref, got)
    s = stats.setdefault(name, {"max_abs": 0.0, "max_ref": 0.0, "sum": 0.0, "n": 0, "bad": 0, "ref_bad": 0})
    s["max_abs"] = max(s["max_abs"], d.max_abs)
    s["max_ref"] = max(s["max_ref"], d.reference_max)
    s["sum"] += d.sum_abs
    s["n"] += d.finite_pairs
    s["bad"] += d.mismatches
    s["ref_bad"] += d.reference_nonfinite


def compare_output_lists(
    reference: Sequence[Sequence[np.ndarray]],
    candidate: Sequence[Sequence[np.ndarray]],
    names: Sequence[str],
    *,
    atol: float,
    rtol: float,
) -> ComparisonReport:
    """Gather per-output errors over batches of outputs (one list per batch, outputs in
    `names` order).

    An output passes when max|a-b| <= atol + rtol * max|reference| (its relative
    error is max|a-b| / max|reference|), both over the elements where both are finite,
    and NaN and inf appear in the candidate exactly where, and as, they appear in the
    reference (`nonfinite_mismatches` is 0).
    """
    stats: dict = {}
    for ref_batch, got_batch in zip(reference, candidate, strict=True):
        if len(got_batch) != len(names) or len(ref_batch) != len(names):
            raise VerificationError(
                f"expected {len(names)} outputs, got {len(ref_batch)} and {len(got_batch)}"
            )
        for name, ref, got in zip(names, ref_batch, got_batch):
            _accumulate(stats, name, ref, got)
    report = ComparisonReport(atol=atol, rtol=rtol, batches=len(reference))
    for name in names:
        s = stats[name]
        rel = s["max_abs"] / s["max_ref"] if s["max_ref"] > 0 else s["max_abs"]
        report.outputs.append(
            OutputError(
                name=name,
                max_abs_err=s["max_abs"],
                max_rel_err=rel,
                mean_abs_err=s["sum"] / max(s["n"], 1),
                passed=bool(s["bad"] == 0 and s["max_abs"] <= atol + rtol * s["max_ref"]),
                nonfinite_mismatches=s["bad"],
                reference_nonfinite=s["ref_bad"],
            )
        )
    return report


def compare_models(
    reference: keras.Model,
    candidate: keras.Model,
    *,
    inputs: Sequence[np.ndarray] | None = None,
    samples: int = 3,
    batch_size: int = 8,
    seed: int = 0,
    atol: float = 1e-5,
    rtol: float = 1e-5,
) -> ComparisonReport:
    """Compare two Keras models' inference outputs.

    Args:
        reference: The model taken as truth (e.g. the unfolded one).
        candidate: The model under test.
        inputs: One list of arrays (one per model input) to compare on; when
            None, `samples` seeded random batches of `batch_size` are drawn.
        samples, batch_size, seed: The random batches.
        atol, rtol: An output passes when max|a-b| <= atol + rtol * max|reference|.
    """
    if inputs is not None:
        check_inputs(reference, inputs)
        batches = [list(inputs)]
    else:
        batches = [random_inputs(reference, batch_size=batch_size, seed=seed + i) for i in range(samples)]
    return compare_output_lists(
        [keras_outputs(reference, b) for b in batches],
        [keras_outputs(candidate, b) for b in batches],
        output_names(reference),
        atol=atol,
        rtol=rtol,
    )


# Whether the float64 twin may judge (`ExactArithmeticCheck.reference_code`).
REFERENCE_CODES = {
    "agrees": "the float64 twin reproduces the float32 original layer by layer, and as a whole within "
              "float32 rounding",
    "layer_differs": "a layer of the float64 twin computes something else than its original on the same inputs",
    "model_differs": "the float64 twin's outputs are further from the float32 original than float32 rounding goes",
    "nonfinite": "the float64 twin and the float32 original disagree on where NaN or inf appear",
    "not_made": "no float64 twin of this model can be made (a layer its config does not recreate)",
}
# How far a float32 model may be from its float64 twin for the twin to count as the same
# function: float32 rounding, amplified through deep nets with wide-ranging statistics,
# was measured at up to 8e-4 relative (EfficientNetV2, random BN statistics). Beyond 1e-2
# the twin is taken for another function, and the float32 verdict stands. The twin's
# layers are checked one by one first (`rebuild.DTYPE_TWIN_RTOL`), which is the fine test.
FLOAT32_MODEL_BOUND = 1e-2


@dataclass
class ExactArithmeticCheck:
    """A candidate (a fold, an export) judged against the model run in float64, which is
    exact arithmetic for float32's purposes, next to the float32 model's own error.

    Deep models with wide-ranging BN statistics amplify float32 rounding beyond any fixed
    tolerance (EfficientNetV2 with random statistics: the float32 model itself errs
    5e-5 to 8e-4 relative), so two correct float32 computations can differ by more than
    1e-5. A candidate is right when its error is of the order of the float32 model's own:
    `candidate_max_rel_err` against `original_max_rel_err`, within the factor of the
    check that made it (see `exact_arithmetic_check` and `fold_exact_check`).

    The float64 twin is itself derived (a rebuild), so it judges only once it is shown
    to be the original's function: each of its layers reproduces its original on the
    same inputs, and its outputs are within `FLOAT32_MODEL_BOUND` of the float32
    original's, with NaN and inf in the same places. `reference_code` says which held
    (`REFERENCE_CODES`); unless it is "agrees", `passed` is False: the float32
    comparison's verdict (failed, or this check would not have run) stands."""

    original_max_rel_err: float | None  # None when the twin could not be made or checked
    candidate_max_rel_err: float | None
    passed: bool
    reference_code: str = "agrees"
    reference_detail: str | None = None  # the layer or the numbers behind a code other than "agrees"
    candidate_nonfinite_mismatches: int = 0  # NaN/inf of the candidate where the float64 reference has none

    @property
    def reference_valid(self) -> bool:
        return self.reference_code == "agrees"

    @property
    def reference_reason(self) -> str:
        return REFERENCE_CODES[self.reference_code]

    def to_dict(self) -> dict:
        return {**asdict(self), "reference_valid": self.reference_valid, "reference_reason": self.reference_reason}


def _wide(batch):
    return [b.astype("float64") if np.issubdtype(b.dtype, np.floating) else b for b in batch]


def _rel(d: nonfinite.Differences) -> float:
    return d.max_abs / d.reference_max if d.reference_max else d.max_abs


def _twin(model, batch):
    """(float64 twin, None) or (None, (code, detail)): the twin checked layer by layer."""
    from keras_bn_ext.rebuild import with_dtype

    try:
        return with_dtype(model, "float64", check_inputs=batch), None
    except RebuildMismatchError as exc:
        return None, ("layer_differs", str(exc))
    except UnsupportedModelError as exc:
        return None, ("not_made", str(exc))


def _twin_agrees(references, owns) -> tuple[float, tuple | None]:
    """The float32 model's own error against its twin, and why the twin may not judge."""
    worst, bad = 0.0, 0
    for ref, own in zip(references, owns, strict=True):
        d = nonfinite.differences(ref, own)
        worst, bad = max(worst, _rel(d)), bad + d.mismatches
    if bad:
        return worst, ("nonfinite", f"{bad} elements are NaN/inf in one and not the other")
    if worst > FLOAT32_MODEL_BOUND:
        return worst, ("model_differs", f"the float32 original is {worst:.3g} relative from its float64 twin "
                                        f"(float32 rounding bound {FLOAT32_MODEL_BOUND:g})")
    return worst, None


def _judge(references, owns, candidates, *, atol, rtol, factor) -> ExactArithmeticCheck:
    orig_rel, why = _twin_agrees(references, owns)
    cand_rel, passed, bad = 0.0, True, 0
    for ref, own, got in zip(references, owns, candidates, strict=True):
        own_d, got_d = nonfinite.differences(ref, own), nonfinite.differences(ref, got)
        bad += got_d.mismatches
        passed = passed and got_d.max_abs <= atol + rtol * got_d.reference_max + factor * own_d.max_abs
        cand_rel = max(cand_rel, _rel(got_d))
    code, detail = why or ("agrees", None)
    return ExactArithmeticCheck(original_max_rel_err=orig_rel, candidate_max_rel_err=cand_rel,
                                passed=bool(passed and not bad and why is None), reference_code=code,
                                reference_detail=detail, candidate_nonfinite_mismatches=bad)


def _refused(code_detail) -> ExactArithmeticCheck:
    code, detail = code_detail
    return ExactArithmeticCheck(original_max_rel_err=None, candidate_max_rel_err=None, passed=False,
                                reference_code=code, reference_detail=detail)


def _flat(per_batch):
    return [o for outputs in per_batch for o in outputs]


def exact_arithmetic_check(
    model: keras.Model,
    batches: Sequence[Sequence[np.ndarray]],
    candidate_outputs: Sequence[Sequence[np.ndarray]],
    *,
    atol: float,
    rtol: float,
    factor: float = 4.0,
    model_outputs: Sequence[Sequence[np.ndarray]] | None = None,
) -> ExactArithmeticCheck:
    """Judge float32 `candidate_outputs` of another runtime (one list per batch, outputs
    flattened as `output_names`) against `model` in float64: they pass when their error
    is at most atol + rtol * max|reference| + `factor` x the float32 model's own, with no
    NaN or inf the reference lacks, and only when the float64 twin is shown to be the
    model's function (`ExactArithmeticCheck`). Two independent float32 computations err
    alike; 4x leaves room for their scatter, and a wrong graph errs by orders of magnitude
    more. `model_outputs`: the float32 model's outputs on `batches`, when the caller has
    them already."""
    twin, why = _twin(model, batches[0])
    if twin is None:
        return _refused(why)
    if model_outputs is None:
        model_outputs = [keras_outputs(model, b) for b in batches]
    return _judge(_flat(keras_outputs(twin, _wide(b)) for b in batches), _flat(model_outputs),
                  _flat(candidate_outputs), atol=atol, rtol=rtol, factor=factor)


def fold_exact_check(
    model: keras.Model,
    folded: keras.Model,
    batches: Sequence[Sequence[np.ndarray]],
    *,
    atol: float,
    rtol: float,
    model_outputs: Sequence[Sequence[np.ndarray]] | None = None,
    folded_outputs: Sequence[Sequence[np.ndarray]] | None = None,
) -> ExactArithmeticCheck:
    """Judge a fold in exact arithmetic: the folded model (its float32 weights, as they
    will be stored) and the original both run in float64, so only what the fold changed
    shows. It passes when that change is no larger than the float32 rounding the
    original already carries (atol + rtol * max|reference| + 1 x its own error). Both
    twins must first be shown to be their float32 models' functions (layer by layer, and
    within `FLOAT32_MODEL_BOUND` as a whole), else it does not pass.
    `model_outputs`/`folded_outputs`: the float32 outputs on `batches`, if already computed."""
    twin, why = _twin(model, batches[0])
    folded_twin, folded_why = _twin(folded, batches[0])
    if twin is None or folded_twin is None:
        return _refused(why or folded_why)
    wide = [_wide(b) for b in batches]
    if model_outputs is None:
        model_outputs = [keras_outputs(model, b) for b in batches]
    if folded_outputs is None:
        folded_outputs = [keras_outputs(folded, b) for b in batches]
    folded_wide = _flat(keras_outputs(folded_twin, b) for b in wide)
    _, folded_why = _twin_agrees(folded_wide, _flat(folded_outputs))
    if folded_why is not None:
        return _refused((folded_why[0], "the folded model's twin: " + folded_why[1]))
    return _judge(_flat(keras_outputs(twin, b) for b in wide), _flat(model_outputs), folded_wide,
                  atol=atol, rtol=rtol, factor=1.0)
