"""Model rebuild: a fresh copy of a Functional/Sequential model (nested models included)
with some BN layers dropped and some layers' weights replaced.

Every layer is recreated from its config (names kept) and receives its original
state as keras.saving would give it: each layer of its tree loads what the original's
`save_own_variables` stores (so `load_own_variables` hooks run, e.g. Normalization's
adapted statistics, which its call reads from tensors, not variables) and, for layers
with assets (lookup vocabularies), what `save_assets` writes. The fold targets receive
the folded weights instead. Operations that are not layers (`x + 3.0`, `keras.ops.pad`,
... called on symbolic tensors) are recreated from their config too, with their
arguments and constants.

Config and saved state are a layer's own account of itself, and a layer may leave
something out. So a rebuild given `check_inputs` does not trust them: it replays the
original graph on those inputs and runs every rebuilt layer the plan did not change on
the very inputs its original received (`LayerCheck`); one that computes something else
raises `RebuildMismatchError`, naming it.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from typing import Sequence

import keras
import numpy as np

from keras_bn_ext import _keras_internals as internals
from keras_bn_ext import nonfinite
from keras_bn_ext.errors import RebuildMismatchError, UnsupportedModelError
from keras_bn_ext.graph import graph_of, is_rebuildable_model

__all__ = ["LayerCheck", "RebuildPlan", "rebuild", "with_dtype", "SAME_DTYPE_RTOL", "DTYPE_TWIN_RTOL"]

# A rebuilt layer with its original's config and state, on the same inputs, runs the same
# kernels: its outputs match to the last bits (1e-6 of max|output| leaves room for a
# kernel's choice of summation order).
SAME_DTYPE_RTOL = 1e-6
# One float32 layer against its float64 copy on the same (float32) inputs differs only by
# that layer's own float32 rounding: a few units of 2^-24 of the terms it sums, far below
# 1e-4 of max|output| for any layer of a real network (measured with random BN statistics:
# at most 6.1e-7 over the 272 layers of EfficientNetV2B0, 5.7e-7 on ResNet50, 4.7e-7 on
# MobileNetV2). A layer that lost state errs by O(1).
DTYPE_TWIN_RTOL = 1e-4


@dataclass
class RebuildPlan:
    drop: set[int] = field(default_factory=set)  # id(bn) replaced by identity
    new_weights: dict[int, list] = field(default_factory=dict)  # id(layer) -> weights
    named_identity: set[int] = field(default_factory=set)  # id(bn) in drop: an Identity takes its name
    # id(layer) -> the config it is rebuilt from (a fold's target with a bias, ReLU6 -> ReLU)
    configs: dict[int, dict] = field(default_factory=dict)
    dtype: str | None = None  # every float layer, input and weight in this dtype (a float64 twin)
    # id(op) -> factory(op) of what runs in its place: a layer, or a callable on its inputs
    # that calls layers (quantization-aware training swaps conv + BN for one fused layer)
    replace: dict[int, object] = field(default_factory=dict)


@dataclass
class LayerCheck:
    """One rebuilt layer (or operation) run on its original's inputs, against the original."""

    layer: str  # its name (a path inside nested models)
    kind: str  # its class
    max_rel_err: float  # max|new - original| / max|original|, over the finite elements
    mismatches: int  # elements where one has NaN/inf and the other not (`nonfinite`)
    passed: bool


def _identity(inputs, *args, **kwargs):
    return inputs


def _named_identity(name: str):
    """An Identity layer called with the input alone (a BN's call carries training/mask)."""
    layer = keras.layers.Identity(name=name)

    def call(inputs, *args, **kwargs):
        return layer(inputs)

    call.layer = layer  # what a Sequential holds instead
    return call


def _copy_operation(op):
    """A new instance of a non-layer operation (it holds no weights). An operation whose
    config does not recreate it is stateless by contract, so the same instance serves."""
    try:
        return type(op).from_config(op.get_config())
    except Exception:  # noqa: BLE001 - e.g. an op whose __init__ takes no config keys
        return op


class _Rebuilder:
    def __init__(self, plan: RebuildPlan):
        self.plan = plan
        self.copies: dict[int, object] = {}  # id(original op) -> new op (shared stays shared)
        self.pending: list[tuple[keras.layers.Layer, list]] = []
        self.shared: list[str] = []  # layers used as they are: their config does not recreate them
        self.changed: set[int] = set(plan.drop) | set(plan.new_weights) | set(plan.configs) | set(plan.replace)
        self.node_by_node: set[int] = set()  # nested models rebuilt node by node (not copied whole)

    def copy_layer(self, layer):
        key = id(layer)
        if key in self.copies:
            return self.copies[key]
        if key in self.plan.replace:
            new = self.plan.replace[key](layer)
        elif key in self.plan.drop:
            new = _named_identity(layer.name) if key in self.plan.named_identity else _identity
        elif is_rebuildable_model(layer):
            new = self._copy_untouched_model(layer)
            if new is None:
                self.node_by_node.add(key)
                new = self.model(layer)
        elif not isinstance(layer, keras.layers.Layer):
            new = _copy_operation(layer)
        elif type(layer) is keras.layers.Lambda:
            # Made from the function object in memory, as the user made it: its config holds
            # the bytecode, which reloads without the globals it reads (`keras`, say).
            new = keras.layers.Lambda(layer.function, output_shape=internals.lambda_output_shape(layer), mask=layer.mask,
                                      arguments=layer.arguments, name=layer.name,
                                      dtype=self.plan.dtype or layer.dtype_policy.name)
        elif type(layer) is keras.layers.Identity:
            # Stateless; a parent layer may have made it with arguments its config cannot
            # hold (keras_hub's HGNetV2 layers do), so it is made afresh.
            new = keras.layers.Identity(name=layer.name, dtype=self.plan.dtype or layer.dtype_policy.name)
        else:
            try:
                config = self.plan.configs.get(key) or layer.get_config()
                if self.plan.dtype and "dtype" in config:
                    config["dtype"] = self.plan.dtype
                new = type(layer).from_config(config)
            except Exception as exc:  # noqa: BLE001 - a config that does not recreate its layer
                new = self._same_instance(layer, exc)
                self.copies[key] = new
                return new
            weights = self.plan.new_weights.get(key)
            if weights is not None:  # a fold target (in `changed` from the plan)
                self.pending.append((new, lambda new=new, w=weights: new.set_weights(w)))
            else:
                self.pending.append((new, lambda new=new, old=layer: self._copy_state(old, new)))
        self.copies[key] = new
        return new

    def _cast(self, value):
        array = np.asarray(keras.ops.convert_to_numpy(value)) if not isinstance(value, np.ndarray) else value
        if self.plan.dtype and np.issubdtype(array.dtype, np.floating):
            return array.astype(self.plan.dtype)
        return array

    def _copy_state(self, old, new):
        """`new` receives `old`'s state as keras.saving would load it: layer by layer of the
        tree, the variables its `save_own_variables` stores (through `load_own_variables`,
        whose hooks finish state the variables alone do not hold), then its assets."""
        olds, news = internals.layer_tree(old), internals.layer_tree(new)
        pairs = list(zip(olds, news))
        if len(olds) != len(news) or any(type(a) is not type(b) for a, b in pairs):
            new.set_weights([self._cast(w) for w in old.get_weights()])  # a tree its config reshaped
            return
        for a, b in pairs:
            store: dict = {}
            a.save_own_variables(store)
            b.load_own_variables({k: self._cast(v) for k, v in store.items()})
            if hasattr(a, "save_assets") and hasattr(b, "load_assets"):  # keras.saving's own test
                with tempfile.TemporaryDirectory(prefix="keras_bn_ext_assets_") as tmp:
                    a.save_assets(tmp)
                    b.load_assets(tmp)

    def _same_instance(self, layer, exc: Exception):
        """A layer whose config does not recreate it (a keras_hub class whose get_config()
        returns keys its __init__ rejects, say): the folded model uses the same instance
        when the plan leaves it unchanged. Inference is the same; such a model can be
        exported, but a saved file holding it would not load (fold_to_file checks)."""
        key = id(layer)
        if self.plan.dtype or key in self.plan.new_weights or key in self.plan.configs:
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise UnsupportedModelError(
                f"layer '{layer.name}' ({type(layer).__name__}) cannot be recreated from its config "
                f"({type(exc).__name__}: {first})"
            ) from None
        self.shared.append(f"{layer.name} ({type(layer).__name__})")
        return layer

    def _copy_untouched_model(self, model):
        """A nested model the plan leaves alone, copied as keras.saving would copy it: by
        its own class's config, then its weights. It keeps its class (a KerasHub image
        encoder stays a `MiTBackbone`), and the layers its constructor makes need not be
        recreated from their own configs (some of keras_hub's cannot be). None when the
        plan changes it, for a dtype twin, or when its config does not recreate it."""
        if self.plan.dtype:
            return None
        changed = self.plan.drop | set(self.plan.new_weights) | set(self.plan.configs) | set(self.plan.replace)
        if any(id(inner) in changed for inner in internals.all_sublayers(model)):
            return None
        try:
            new = type(model).from_config(model.get_config())
            self._copy_state(model, new)
        except Exception:  # noqa: BLE001 - rebuild it node by node instead
            return None
        return new

    def _new_inputs(self, graph):
        new = []
        for tensor in graph.inputs:
            dtype = tensor.dtype
            if self.plan.dtype and "float" in keras.backend.standardize_dtype(dtype):
                dtype = self.plan.dtype
            new.append(
                keras.Input(
                    batch_shape=tensor.shape,
                    dtype=dtype,
                    sparse=getattr(tensor, "sparse", False),
                    name=internals.producer_of(tensor).name,
                )
            )
        return new

    def model(self, model: keras.Model) -> keras.Model:
        graph = graph_of(model)
        inputs = self._new_inputs(graph)
        if isinstance(model, keras.Sequential):
            layers = [self.copy_layer(layer) for layer in model.layers]
            layers = [getattr(layer, "layer", layer) for layer in layers if layer is not _identity]
            new = keras.Sequential([internals.producer_of(inputs[0]), *layers],
                                   name=model.name, trainable=model.trainable)
        else:
            # The inputs in the original's structure (list, dict or single tensor).
            packed = keras.tree.pack_sequence_as(internals.inputs_struct(graph), inputs)
            outputs = internals.run_through_graph(graph, packed, operation_fn=self.copy_layer)
            new = keras.Model(packed, outputs, name=model.name, trainable=model.trainable)
        self._assign_weights()
        return new

    def _assign_weights(self, *, all_: bool = False):
        """Give the built copies their weights. A nested model is finished before the
        Sequential holding it has called (built) the layers copied before it: those
        wait for the outer model (`all_` at the end: every copy)."""
        waiting = []
        for layer, assign in self.pending:
            if layer.built or all_:
                assign()
            else:
                waiting.append((layer, assign))
        self.pending = waiting

    # The layer-by-layer check: the original graph replayed on real values, each rebuilt
    # layer that should compute what its original computes run beside it on the same inputs.
    def check(self, model, inputs: Sequence[np.ndarray], *, rtol: float) -> list[LayerCheck]:
        checks: list[LayerCheck] = []

        def wrap(op, prefix):
            run = internals.in_inference(op)
            key = id(op)
            if key in self.node_by_node:
                inner = graph_of(op)

                def replay(x, *args, **kwargs):
                    return internals.run_through_graph(inner, internals.standardized_inputs(inner, x),
                                                       operation_fn=lambda o: wrap(o, f"{prefix}{op.name}/"))
                return replay
            copy = self.copies.get(key)
            if copy is None or copy is op or key in self.changed or not callable(copy):
                return run
            copy_run = internals.in_inference(copy)

            def shadowed(*args, **kwargs):
                out = run(*args, **kwargs)
                args2, kwargs2 = keras.tree.map_structure(self._widen, (args, kwargs))
                checks.append(_layer_check(f"{prefix}{getattr(op, 'name', type(op).__name__)}", op,
                                           out, copy_run(*args2, **kwargs2), rtol))
                return out
            return shadowed

        graph = graph_of(model)
        x = keras.tree.pack_sequence_as(internals.inputs_struct(graph), [np.asarray(a) for a in inputs])
        internals.run_through_graph(graph, internals.standardized_inputs(graph, x),
                                    operation_fn=lambda op: wrap(op, ""))
        return checks

    def _widen(self, value):
        """A float tensor argument in the plan's dtype (a twin's layer takes float64)."""
        if not self.plan.dtype or not keras.ops.is_tensor(value) and not isinstance(value, np.ndarray):
            return value
        if "float" not in keras.backend.standardize_dtype(value.dtype):
            return value
        return keras.ops.cast(value, self.plan.dtype)


def _layer_check(name, op, reference, candidate, rtol) -> LayerCheck:
    refs, cands = keras.tree.flatten(reference), keras.tree.flatten(candidate)
    worst, mismatches, passed = 0.0, 0, len(refs) == len(cands)
    for r, c in zip(refs, cands):
        r = np.asarray(keras.ops.convert_to_numpy(r))
        c = np.asarray(keras.ops.convert_to_numpy(c))
        if r.shape != c.shape:
            passed, worst = False, float("inf")
            continue
        d = nonfinite.differences(r, c)
        rel = d.max_abs / d.reference_max if d.reference_max else d.max_abs
        worst, mismatches = max(worst, rel), mismatches + d.mismatches
        passed = passed and d.mismatches == 0 and d.max_abs <= rtol * d.reference_max
    return LayerCheck(layer=name, kind=type(op).__name__, max_rel_err=worst, mismatches=mismatches, passed=passed)


def rebuild(model: keras.Model, plan: RebuildPlan, *, shared: list | None = None,
            check_inputs: Sequence[np.ndarray] | None = None, checks: list | None = None) -> keras.Model:
    """A new model with the plan applied; `model` itself is never changed. `shared`, if
    given, receives the layers used as they are (their config does not recreate them).

    `check_inputs` (one array per model input, a small batch): every rebuilt layer the
    plan does not change is run on the inputs its original receives there and must
    reproduce it (to `SAME_DTYPE_RTOL`, or `DTYPE_TWIN_RTOL` for a dtype twin; NaN and
    inf in the same places); `checks`, if given, receives every `LayerCheck`.

    Raises:
        RebuildMismatchError: a rebuilt layer computes something else than its original.

    Layers are copied from objects already in memory, not from an untrusted file: the
    choice of safe mode was made when `model` was loaded, so a Lambda layer that is
    here may be copied (safe mode off for the copy only).
    """
    with internals.unsafe_deserialization():
        rebuilder = _Rebuilder(plan)
        new = rebuilder.model(model)
        rebuilder._assign_weights(all_=True)
        if shared is not None:
            shared.extend(rebuilder.shared)
    if check_inputs is not None:
        rtol = DTYPE_TWIN_RTOL if plan.dtype else SAME_DTYPE_RTOL
        try:
            found = rebuilder.check(model, check_inputs, rtol=rtol)
        except Exception as exc:  # noqa: BLE001 - a graph that cannot be replayed eagerly
            if plan.dtype:  # a twin that cannot be checked does not judge anything
                raise UnsupportedModelError(
                    f"the {plan.dtype} twin cannot be checked layer by layer: the graph does not replay "
                    f"eagerly ({type(exc).__name__}: {str(exc).strip()[:200]})") from None
            found = []  # the caller's whole-model comparison is then the only check
        if checks is not None:
            checks.extend(found)
        bad = next((c for c in found if not c.passed), None)
        if bad is not None:
            what = f"{bad.mismatches} NaN/inf elements of another kind" if bad.mismatches else \
                f"max rel err {bad.max_rel_err:.3g}, tolerance {rtol:g}"
            raise RebuildMismatchError(
                f"layer '{bad.layer}' ({bad.kind}) rebuilt from its config and saved state computes something "
                f"else than the original on the same inputs ({what}): it holds state that neither its config "
                "nor keras.saving's per-layer variables and assets carry", layer=bad.layer,
                max_rel_err=bad.max_rel_err, mismatches=bad.mismatches)
    return new


def with_dtype(model: keras.Model, dtype: str = "float64", *,
               check_inputs: Sequence[np.ndarray] | None = None) -> keras.Model:
    """A twin of `model` computing in `dtype` (float64: an exact-arithmetic oracle for
    float32 models). Layers, inputs and weights are converted; nothing is folded.
    `check_inputs`: each layer of the twin checked against its original (`rebuild`)."""
    return rebuild(model, RebuildPlan(dtype=dtype), check_inputs=check_inputs)
