"""Model rebuild: a fresh copy of a Functional/Sequential model (nested models included)
with some BN layers dropped and some layers' weights replaced.

Every layer is recreated from its config (names kept) and receives its original
weights bit for bit, except the fold targets, which receive the folded ones. Operations
that are not layers (`x + 3.0`, `keras.ops.pad`, ... called on symbolic tensors) are
recreated from their config too, with their arguments and constants.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import keras
import numpy as np

from keras_bn_ext import _keras_internals as internals
from keras_bn_ext.errors import UnsupportedModelError
from keras_bn_ext.graph import graph_of, is_rebuildable_model

__all__ = ["RebuildPlan", "rebuild", "with_dtype"]


@dataclass
class RebuildPlan:
    drop: set[int] = field(default_factory=set)  # id(bn) replaced by identity
    new_weights: dict[int, list] = field(default_factory=dict)  # id(layer) -> weights
    named_identity: set[int] = field(default_factory=set)  # id(bn) in drop: an Identity takes its name
    # id(layer) -> the config it is rebuilt from (a fold's target with a bias, ReLU6 -> ReLU)
    configs: dict[int, dict] = field(default_factory=dict)
    dtype: str | None = None  # every float layer, input and weight in this dtype (a float64 twin)


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

    def copy_layer(self, layer):
        key = id(layer)
        if key in self.copies:
            return self.copies[key]
        if key in self.plan.drop:
            new = _named_identity(layer.name) if key in self.plan.named_identity else _identity
        elif is_rebuildable_model(layer):
            new = self._copy_untouched_model(layer) or self.model(layer)
        elif not isinstance(layer, keras.layers.Layer):
            new = _copy_operation(layer)
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
            weights = weights if weights is not None else layer.get_weights()
            if self.plan.dtype:
                weights = [np.asarray(w).astype(self.plan.dtype) if np.issubdtype(np.asarray(w).dtype, np.floating)
                           else w for w in weights]
            self.pending.append((new, weights))
        self.copies[key] = new
        return new

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
        changed = self.plan.drop | set(self.plan.new_weights) | set(self.plan.configs)
        if any(id(inner) in changed for inner in internals.all_sublayers(model)):
            return None
        try:
            new = type(model).from_config(model.get_config())
            new.set_weights(model.get_weights())
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
        for layer, weights in self.pending:
            if layer.built or all_:
                layer.set_weights(weights)
            else:
                waiting.append((layer, weights))
        self.pending = waiting


def rebuild(model: keras.Model, plan: RebuildPlan, *, shared: list | None = None) -> keras.Model:
    """A new model with the plan applied; `model` itself is never changed. `shared`, if
    given, receives the layers used as they are (their config does not recreate them).

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
        return new


def with_dtype(model: keras.Model, dtype: str = "float64") -> keras.Model:
    """A twin of `model` computing in `dtype` (float64: an exact-arithmetic oracle for
    float32 models). Layers, inputs and weights are converted; nothing is folded."""
    return rebuild(model, RebuildPlan(dtype=dtype))
