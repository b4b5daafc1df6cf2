"""`recalibrate_batchnorms`: set BN moving statistics from data (AdaBN, `update_bn`).

Moving statistics lag behind weights that kept changing (Keras's momentum 0.99 over a
short training), or belong to another domain than the one the model will see. This
re-estimates them on data the user gives, for `keras.layers.BatchNormalization` and
`keras_bn_ext.BatchNormalization` alike, at any depth of nesting:

- `mode="exact"`: what inference will see. Each BN's moving mean and variance become
  the mean and the biased variance (the layer's training convention) of that BN's own
  inputs over all the data, the model running in inference mode with every BN before it
  already recalibrated. BNs that do not depend on each other are done together (one
  *level*), so the cost is one pass over the data per level, each pass stopping after
  the last BN of its level. Sums are taken in float64 (Chan's pairwise update per batch).
- `mode="running"`: PyTorch's `torch.optim.swa_utils.update_bn` in one pass: every BN
  normalizes each batch with that batch's own statistics (only the BNs: dropout and the
  rest stay in inference), and its moving statistics become the equal-weight average of
  those batch statistics (biased variance, Keras's convention; PyTorch averages the
  unbiased one).

BN inputs are read by wrapping each BN layer's `call` for the duration (the model is
never rebuilt), so masks reach the statistics exactly as Keras gives them to the layer
(positions masked out take no part), and subclassed models work too. The model changes
only when everything succeeded; on any error every BN is restored.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import keras
import numpy as np

from keras_bn_ext import _keras_internals as internals
from keras_bn_ext.data import array_batches, dataset_batches, is_array_data, model_arrays
from keras_bn_ext.errors import InputDataError
from keras_bn_ext.folding.affine import is_batchnorm
from keras_bn_ext.graph import graph_of, is_rebuildable_model
from keras_bn_ext.recalibration.options import BATCH_SIZE, MODES

__all__ = ["recalibrate_batchnorms", "RecalibrationReport", "BNRecalibration", "SkippedBN", "Batches",
           "bn_layers", "statistics_of"]


@dataclass
class BNRecalibration:
    """One BN: its statistics before and after, and the data they were taken over."""

    bn: str  # name, prefixed by the names of the layers it is nested in
    level: int  # exact mode: the pass that estimated it (1 = depends on no other BN)
    calls: int  # calls per forward pass (a shared BN pools the inputs of all of them)
    samples: int  # data samples that reached it
    values_per_channel: int  # values each channel's statistics were taken over (the least)
    old_mean: list[float]
    new_mean: list[float]
    old_variance: list[float]
    new_variance: list[float]

    @property
    def mean_shift(self) -> float:
        """max |new - old| mean, in units of the new standard deviation."""
        new_std = np.sqrt(np.maximum(self.new_variance, 1e-12))
        return float(np.max(np.abs(np.subtract(self.new_mean, self.old_mean)) / new_std, initial=0.0))

    @property
    def variance_ratio(self) -> float:
        """The largest new/old (or old/new) variance ratio over the channels."""
        old = np.maximum(self.old_variance, 1e-12)
        new = np.maximum(self.new_variance, 1e-12)
        return float(np.max(np.maximum(new / old, old / new), initial=1.0))

    def to_dict(self) -> dict:
        return {**asdict(self), "mean_shift": self.mean_shift, "variance_ratio": self.variance_ratio}


@dataclass
class SkippedBN:
    bn: str
    code: str  # stable: "frozen" or "not_called"
    reason: str


@dataclass
class RecalibrationReport:
    mode: str
    samples: int
    batch_size: int | None  # None when the data came as a dataset of batches
    batches: int  # batches per pass
    levels: int
    passes: int  # passes over the data (exact: one per level, each stopping early)
    # Exact mode on a graph: the most activations kept between passes at once (MiB).
    kept_peak_mb: float | None = None
    batchnorms: list[BNRecalibration] = field(default_factory=list)
    skipped: list[SkippedBN] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "samples": self.samples,
            "batch_size": self.batch_size,
            "batches": self.batches,
            "levels": self.levels,
            "passes": self.passes,
            "kept_peak_mb": self.kept_peak_mb,
            "bn_recalibrated": len(self.batchnorms),
            "batchnorms": [b.to_dict() for b in self.batchnorms],
            "skipped": [asdict(s) for s in self.skipped],
            "seconds": self.seconds,
        }


class _StopForward(Exception):
    """Raised by a wrapped BN once a pass has what it came for (Keras may re-create it
    with a longer message: the class is what matters)."""


def recalibrate_batchnorms(
    model: keras.Model,
    data,
    *,
    mode: str = "exact",
    batch_size: int = BATCH_SIZE,
    include_frozen: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
) -> RecalibrationReport:
    """Re-estimate the moving statistics of every BatchNormalization in `model` from data.

    Args:
        model: A Keras model (Functional, Sequential, nested or subclassed) holding
            `keras.layers.BatchNormalization` or `keras_bn_ext.BatchNormalization`.
            Changed in place, only if the whole recalibration succeeds.
        data: Real inputs: one array, a list of as many arrays as the model has
            inputs (in input order), or a dict keyed by input name (samples on axis 0;
            other keys, e.g. labels, are ignored); or a `tf.data.Dataset` /
            `keras.utils.PyDataset` / any other list of batches, each `x` or
            `(x, y[, sample_weight])`. Exact mode reads it once per level, so a
            one-shot iterator or generator is refused there.
        mode: "exact" (default) or "running" (see the module docstring).
        batch_size: Samples per forward pass when `data` is arrays.
        include_frozen: Keyword-only. Recalibrate BNs with `trainable=False` too
            (default); False leaves them as they are (reported as skipped).
        progress: Optional `progress(phase, done, total)` callback, per batch.

    Returns:
        A RecalibrationReport: per BN the statistics before and after, the samples used,
        the levels and passes it took.

    Raises:
        InputDataError: the data does not fit the model (a missing input, a wrong
            shape or dtype, no samples, NaN or infinity), or exact mode got a one-shot
            iterator. ValueError: a bad `mode` or `batch_size`.
    """
    if mode not in MODES:
        raise ValueError(f"Argument `mode` must be one of {MODES}. Received: mode={mode!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"Argument `batch_size` must be a positive integer. Received: batch_size={batch_size!r}")
    start = time.perf_counter()
    batches = Batches(model, data, batch_size, one_pass=mode == "running")
    bns = bn_layers(model)
    snapshot = {id(bn): [np.array(keras.ops.convert_to_numpy(v)) for v in bn.non_trainable_weights] for bn in bns}
    before = {id(bn): (_numpy(bn.moving_mean), _numpy(bn.moving_variance)) for bn in bns}
    report = RecalibrationReport(mode=mode, samples=0, batch_size=batches.batch_size, batches=0,
                                 levels=0, passes=0)
    try:
        with _Interceptor(bns) as interceptor:
            first = next(iter(batches), None)
            if first is None:
                raise InputDataError("the data holds no batches")
            calls, order = interceptor.discover(model, first)
            paths = _paths(model)
            report.passes = 1
            chosen = []
            for bn in bns:
                path = paths.get(id(bn), bn.name)
                if not calls.get(id(bn)):
                    report.skipped.append(SkippedBN(path, "not_called", "the model's forward pass never calls it"))
                elif not bn.trainable and not include_frozen:
                    report.skipped.append(SkippedBN(path, "frozen", "trainable=False and include_frozen=False"))
                else:
                    chosen.append(bn)
            if mode == "exact" and is_rebuildable_model(model):
                replay = _GraphReplay(model, chosen, order)
                levels = replay.levels(first)
                results = _exact(model, chosen, levels, calls, batches, interceptor, report, progress,
                                 forward=replay.forward)
                report.kept_peak_mb = round(replay.peak_bytes / 2**20, 1)
            elif mode == "exact":
                levels = _sequential_levels(chosen, order)
                results = _exact(model, chosen, levels, calls, batches, interceptor, report, progress)
            else:
                levels = {id(bn): 1 for bn in chosen}
                results = _running(model, chosen, batches, interceptor, report, progress)
        for bn in chosen:
            mean, variance, samples, values = results[id(bn)]
            old_mean, old_variance = before[id(bn)]
            report.batchnorms.append(BNRecalibration(
                bn=paths.get(id(bn), bn.name), level=levels[id(bn)], calls=calls[id(bn)],
                samples=samples, values_per_channel=values,
                old_mean=old_mean.tolist(), new_mean=mean.tolist(),
                old_variance=old_variance.tolist(), new_variance=variance.tolist()))
    except BaseException:
        _restore(bns, snapshot)
        raise
    report.seconds = round(time.perf_counter() - start, 4)
    return report


# -- the data ---------------------------------------------------------------

class Batches:
    """The data as a re-iterable sequence of batches (lists of arrays in input order)."""

    def __init__(self, model, data, batch_size: int, *, one_pass: bool):
        self.model = model
        inputs = len(getattr(model, "inputs", None) or []) or 1
        if is_array_data(data) and not (isinstance(data, (list, tuple)) and len(data) != inputs):
            self.arrays = model_arrays(model, data)
            self.batch_size = batch_size
            self.dataset = None
        else:
            if iter(data) is data and not one_pass:
                raise InputDataError(
                    "exact recalibration reads the data once per level of BNs; a one-shot "
                    "iterator or generator can be read only once: give arrays, a list of "
                    "batches, a tf.data.Dataset or a keras.utils.PyDataset (or mode='running')"
                )
            self.arrays, self.batch_size, self.dataset = None, None, data

    def __iter__(self):
        if self.arrays is not None:
            return array_batches(self.arrays, self.batch_size)
        return dataset_batches(self.model, self.dataset)


def _model_inputs(model, batch):
    """A batch (arrays in `model.inputs` order) in the structure the model was built with
    (a dict keeps its keys), as Keras wants it without a warning."""
    if is_rebuildable_model(model):
        return keras.tree.pack_sequence_as(internals.inputs_struct(graph_of(model)), list(batch))
    return batch if len(batch) > 1 else batch[0]


def _call(model, batch):
    return model(_model_inputs(model, batch), training=False)


# -- reading BN inputs --------------------------------------------------------

class _Interceptor:
    """Wraps each BN's `call` while active: `handler(bn, args, kwargs, original)` decides
    what the call returns. Without a handler the BN runs as it is."""

    def __init__(self, bns):
        self.bns = bns
        self.handler = None

    def __enter__(self):
        for bn in self.bns:
            original = bn.call

            def call(*args, _bn=bn, _original=original, **kwargs):
                if self.handler is None:
                    return _original(*args, **kwargs)
                return self.handler(_bn, args, kwargs, _original)

            vars(bn)["call"] = call
        return self

    def __exit__(self, *exc):
        for bn in self.bns:
            vars(bn).pop("call", None)
        return False

    def discover(self, model, batch):
        """One full forward pass: how often each BN is called, and in which order."""
        calls, order = {}, {}

        def count(bn, args, kwargs, original):
            calls[id(bn)] = calls.get(id(bn), 0) + 1
            order.setdefault(id(bn), len(order))
            return original(*args, **kwargs)

        self.handler = count
        try:
            _call(model, batch)
        finally:
            self.handler = None
        return calls, order


def _bn_input(args, kwargs):
    x = args[0] if args else kwargs["inputs"]
    mask = kwargs.get("mask")
    # stop_gradient: PyTorch refuses numpy() on a tensor that requires grad.
    x = np.asarray(keras.ops.convert_to_numpy(keras.ops.stop_gradient(x)), np.float64)
    if mask is not None:
        mask = np.asarray(keras.ops.convert_to_numpy(mask)).astype(bool)
        if mask.ndim != x.ndim - 1:
            mask = None  # the layer itself rejects it in training; inference ignores it
    return x, mask


class _Moments:
    """Per-channel count, mean and sum of squared deviations, merged batch by batch in
    float64 (Chan et al.'s pairwise update), with Keras's mask rule: a mask of the
    input's rank - 1 is expanded on the last axis and broadcast to the input."""

    def __init__(self, axis: int):
        self.axis = axis
        self.count = self.mean = self.m2 = None
        self.samples = 0

    def add(self, x: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Merge one batch in; return that batch's own mean and biased variance."""
        count, mean, m2 = self._batch(x, mask)
        self.samples += x.shape[0]
        if self.count is None:
            self.count, self.mean, self.m2 = count, mean, m2
        else:
            total = self.count + count
            safe = np.where(total > 0, total, 1.0)
            delta = mean - self.mean
            self.mean = self.mean + delta * count / safe
            self.m2 = self.m2 + m2 + delta ** 2 * self.count * count / safe
            self.count = total
        return mean, m2 / np.where(count > 0, count, 1.0)

    def _batch(self, x, mask):
        ch = self.axis % x.ndim
        axes = tuple(i for i in range(x.ndim) if i != ch)
        shape = [1] * x.ndim
        shape[ch] = x.shape[ch]
        if mask is None:
            count = np.full(x.shape[ch], x.size // max(x.shape[ch], 1), np.float64)
            mean = x.mean(axis=axes)
            return count, mean, np.square(x - mean.reshape(shape)).sum(axis=axes)
        w = np.broadcast_to(mask[..., None], x.shape).astype(np.float64)
        count = w.sum(axis=axes)
        mean = np.divide((w * x).sum(axis=axes), count, out=np.zeros_like(count), where=count > 0)
        return count, mean, (w * np.square(x - mean.reshape(shape))).sum(axis=axes)

    def result(self, old_mean: np.ndarray, old_variance: np.ndarray):
        """(mean, variance); channels that saw no value keep their old statistics."""
        seen = self.count > 0
        variance = self.m2 / np.where(seen, self.count, 1.0)
        return (np.where(seen, self.mean, old_mean), np.where(seen, variance, old_variance),
                int(self.count.min()) if self.count.size else 0)


def _exact(model, chosen, levels, calls, batches, interceptor, report, progress, forward=None):
    """One pass over the data per level; `forward(level, batch_index, batch)` runs one
    batch (default: the whole model, stopped after the level's last BN)."""
    forward = forward or (lambda level, index, batch: _call(model, batch))
    results = {}
    by_level: dict[int, list] = {}
    for bn in chosen:
        by_level.setdefault(levels[id(bn)], []).append(bn)
    report.levels = len(by_level)
    for number, level in enumerate(sorted(by_level), start=1):
        group = {id(bn): bn for bn in by_level[level]}
        moments = {key: _Moments(bn.axis) for key, bn in group.items()}
        seen: dict[int, int] = {}

        def capture(bn, args, kwargs, original):
            if id(bn) not in group:
                return original(*args, **kwargs)
            moments[id(bn)].add(*_bn_input(args, kwargs))
            seen[id(bn)] = seen.get(id(bn), 0) + 1
            if all(seen.get(key, 0) >= calls[key] for key in group):
                raise _StopForward()  # nothing after this BN matters to this level
            return original(*args, **kwargs)

        interceptor.handler = capture
        count = samples = 0
        try:
            for count, batch in enumerate(batches, start=1):
                samples += len(batch[0])
                seen.clear()
                try:
                    forward(level, count - 1, batch)
                except _StopForward:
                    pass
                if progress:
                    progress(f"level {number}/{report.levels}", count, report.batches or count)
        finally:
            interceptor.handler = None
        report.batches, report.samples = count, samples
        report.passes += 1
        for key, bn in group.items():
            results[key] = _assign(bn, moments[key])
    return results


def _running(model, chosen, batches, interceptor, report, progress):
    targets = {id(bn): bn for bn in chosen}
    # Per BN: the batch statistics of every call, and the data that reached it.
    means, variances = {key: [] for key in targets}, {key: [] for key in targets}
    totals = {key: _Moments(bn.axis) for key, bn in targets.items()}  # samples and counts only

    def normalize(bn, args, kwargs, original):
        if id(bn) not in targets:
            return original(*args, **kwargs)
        x, mask = _bn_input(args, kwargs)
        mean, variance = totals[id(bn)].add(x, mask)  # this batch's, and counted in the totals
        means[id(bn)].append(mean)
        variances[id(bn)].append(variance)
        return _normalized(bn, args[0] if args else kwargs["inputs"], mean, variance)

    interceptor.handler = normalize
    count = samples = 0
    try:
        for count, batch in enumerate(batches, start=1):
            samples += len(batch[0])
            _call(model, batch)
            if progress:
                progress("running", count, count)
    finally:
        interceptor.handler = None
    report.batches, report.samples, report.levels = count, samples, 1
    report.passes += 1
    results = {}
    for key, bn in targets.items():
        mean, variance = np.mean(means[key], axis=0), np.mean(variances[key], axis=0)
        _set_statistics(bn, mean, variance)
        least = int(totals[key].count.min()) if totals[key].count is not None else 0
        results[key] = (mean, variance, totals[key].samples, least)
    return results


def _normalized(bn, x, mean, variance):
    """The BN's output with the given (batch) statistics, as its training call computes it."""
    rank = len(x.shape)
    shape = [1] * rank
    shape[bn.axis % rank] = -1
    inv = 1.0 / np.sqrt(variance + bn.epsilon)
    if bn.scale:
        inv = inv * _numpy(bn.gamma)
    shift = -mean * inv
    if bn.center:
        shift = shift + _numpy(bn.beta)
    scale = keras.ops.convert_to_tensor(np.reshape(inv, shape).astype("float32"))
    offset = keras.ops.convert_to_tensor(np.reshape(shift, shape).astype("float32"))
    y = keras.ops.add(keras.ops.multiply(keras.ops.cast(x, "float32"), scale), offset)
    return keras.ops.cast(y, bn.compute_dtype)


def _assign(bn, moments: _Moments):
    mean, variance, values = moments.result(_numpy(bn.moving_mean), _numpy(bn.moving_variance))
    _set_statistics(bn, mean, variance)
    return mean, variance, moments.samples, values


def _set_statistics(bn, mean, variance) -> None:
    bn.moving_mean.assign(np.asarray(mean, bn.moving_mean.dtype))
    bn.moving_variance.assign(np.asarray(variance, bn.moving_variance.dtype))
    if getattr(bn, "renorm", False) and getattr(bn, "moving_stddev", None) is not None:
        # Renorm tracks the stddev; inference reads moving_variance = stddev**2 - eps.
        bn.moving_stddev.assign(np.sqrt(np.asarray(variance) + bn.epsilon).astype(bn.moving_stddev.dtype))


def _restore(bns, snapshot) -> None:
    for bn in bns:
        for variable, value in zip(bn.non_trainable_weights, snapshot[id(bn)]):
            variable.assign(value)


def bn_layers(model) -> list:
    """Every BN layer of `model` (itself included), at any depth, each once."""
    return [layer for layer in _unique([model, *internals.all_sublayers(model)]) if is_batchnorm(layer)]


def statistics_of(model) -> list[np.ndarray]:
    """The moving mean and variance of every BN of `model`, in `bn_layers` order."""
    return [_numpy(v) for bn in bn_layers(model) for v in (bn.moving_mean, bn.moving_variance)]


def _numpy(variable) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(keras.ops.stop_gradient(variable)), np.float64)


def _unique(layers) -> list:
    seen, out = set(), []
    for layer in layers:
        if id(layer) not in seen:
            seen.add(id(layer))
            out.append(layer)
    return out


# -- levels: which BNs can be estimated in the same pass --------------------------

def _sequential_levels(chosen, order: dict[int, int]) -> dict[int, int]:
    """A subclassed model shows no graph: one level per BN, in the order the forward pass
    calls them (correct whatever they depend on, at the cost of one pass each)."""
    ranked = sorted(chosen, key=lambda bn: order.get(id(bn), 0))
    return {id(bn): number for number, bn in enumerate(ranked, start=1)}


class _Gone:
    """Stands for outputs nothing will read again (every reader's outputs are kept)."""


class _GraphReplay:
    """Exact mode on a Functional or Sequential model: its graph replayed call by call
    with Keras's own runner (nested models entered), in inference as Functional.call
    runs it. Each call is keyed by (operation, occurrence in the pass), so the passes
    agree on keys.

    Levels: a call's outputs carry the highest level of the recalibrated BNs they
    depend on; a BN's call is one more than its inputs'; BNs inside a layer whose call()
    the graph does not show are taken one after another in call order.

    Reuse: a call whose outputs depend only on BNs already recalibrated is final; its
    outputs are kept per batch and returned in later passes instead of recomputed, and
    released once every call that reads them is kept too. A pass therefore computes only
    what the new level changes (and stops after its last BN): the whole recalibration
    costs about one forward pass, plus the memory of the activations between levels
    for every sample (`peak_bytes`)."""

    def __init__(self, model, chosen, order: dict[int, int]):
        self.graph = graph_of(model)
        self.chosen = {id(bn) for bn in chosen}
        self.order = order
        self.out_level: dict[tuple, int] = {}
        self.n_outputs: dict[tuple, int] = {}
        self.readers: dict[tuple, set] = {}
        self.bn_level: dict[int, int] = {}
        self.kept: dict[int, dict] = {}  # batch index -> key -> outputs
        self.gone: dict[int, set] = {}
        self.peak_bytes = 0

    def _run(self, batch, fn):
        occurrences: dict[int, int] = {}

        def visit(op):
            if is_rebuildable_model(op):
                inner = graph_of(op)

                def nested(*args, **kwargs):
                    # Already tensors (or _Gone): the runner only flattens them.
                    return internals.run_through_graph(inner, args[0] if len(args) == 1 else list(args), visit)

                return nested

            def call(*args, **kwargs):
                n = occurrences.get(id(op), 0)
                occurrences[id(op)] = n + 1
                return fn(op, (id(op), n), args, kwargs, lambda: internals.in_inference(op)(*args, **kwargs))

            return call

        x = keras.tree.pack_sequence_as(internals.inputs_struct(self.graph), list(batch))
        return internals.run_through_graph(self.graph, internals.standardized_inputs(self.graph, x), visit)

    def levels(self, batch) -> dict[int, int]:
        """Propagate levels over one batch; again while a shared BN's level (the highest of
        its calls) changes what follows it."""
        for _ in range(len(self.chosen) + 2):
            before = dict(self.bn_level)
            self._propagate(batch)
            if self.bn_level == before:
                break
        return {key: level for key, level in self.bn_level.items() if key in self.chosen}

    def _propagate(self, batch) -> None:
        level_of: dict[int, int] = {}
        producer: dict[int, tuple] = {}

        def fn(op, key, args, kwargs, compute):
            leaves = keras.tree.flatten((args, kwargs))
            level = max((level_of.get(id(t), 0) for t in leaves), default=0)
            for t in leaves:
                if id(t) in producer:
                    self.readers.setdefault(producer[id(t)], set()).add(key)
            if id(op) in self.chosen:
                level = max(level + 1, self.bn_level.get(id(op), 0))
                self.bn_level[id(op)] = level
            elif isinstance(op, keras.layers.Layer) and not is_batchnorm(op):
                hidden = sorted(_unique(bn for bn in internals.all_sublayers(op) if id(bn) in self.chosen),
                                key=lambda bn: self.order.get(id(bn), 0))
                for k, bn in enumerate(hidden, start=1):
                    self.bn_level[id(bn)] = max(self.bn_level.get(id(bn), 0), level + k)
                level += len(hidden)
            outputs = compute()
            flat = keras.tree.flatten(outputs)
            self.out_level[key], self.n_outputs[key] = level, len(flat)
            for t in flat:
                level_of[id(t)] = level
                producer[id(t)] = key
            return outputs

        self._run(batch, fn)

    def forward(self, level: int, index: int, batch) -> None:
        """One batch of the pass for `level`, reusing and keeping final outputs."""
        kept = self.kept.setdefault(index, {})
        gone = self.gone.setdefault(index, set())

        def fn(op, key, args, kwargs, compute):
            if key in kept:
                return kept[key]
            if key in gone:
                n = self.n_outputs.get(key, 1)
                return _Gone() if n == 1 else [_Gone() for _ in range(n)]
            outputs = compute()
            if self.out_level.get(key, level) < level:
                kept[key] = outputs
            return outputs

        try:
            self._run(batch, fn)
        finally:
            for key in list(kept):
                if all(r in kept or r in gone for r in self.readers.get(key, ())):
                    del kept[key]
                    gone.add(key)
            self.peak_bytes = max(self.peak_bytes, sum(
                _nbytes(v) for batch_kept in self.kept.values() for v in batch_kept.values()))


def _nbytes(outputs) -> int:
    return sum(int(np.prod(t.shape)) * np.dtype(keras.backend.standardize_dtype(t.dtype)).itemsize
               for t in keras.tree.flatten(outputs) if hasattr(t, "shape") and hasattr(t, "dtype"))


def _paths(model) -> dict[int, str]:
    """BN id -> name prefixed by the layers it is nested in (as bn-fold names them)."""
    paths: dict[int, str] = {}

    def visit(layer, prefix: str) -> None:
        for inner in getattr(layer, "layers", None) or internals.all_sublayers(layer):
            if id(inner) in paths:
                continue
            if is_batchnorm(inner):
                paths[id(inner)] = prefix + inner.name
            elif internals.all_sublayers(inner):
                visit(inner, f"{prefix}{inner.name}/")

    visit(model, "")
    return paths
