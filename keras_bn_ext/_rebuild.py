"""Model rebuild: a fresh copy of a Functional/Sequential model (nested models included)
with some BN layers dropped and some layers' weights replaced.

Every layer is recreated from its config (names kept) and receives its original
weights bit for bit, except the fold targets, which receive the folded ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import keras

from keras_bn_ext._graph import graph_of, is_rebuildable_model


@dataclass
class RebuildPlan:
    drop: set[int] = field(default_factory=set)  # id(bn) replaced by identity
    new_weights: dict[int, list] = field(default_factory=dict)  # id(layer) -> weights
    force_bias: set[int] = field(default_factory=set)  # id(layer) -> use_bias=True


def _identity(inputs, *args, **kwargs):
    return inputs


class _Rebuilder:
    def __init__(self, plan: RebuildPlan):
        self.plan = plan
        self.copies: dict[int, object] = {}  # id(original op) -> new op (shared stays shared)
        self.pending: list[tuple[keras.layers.Layer, list]] = []

    def copy_layer(self, layer):
        key = id(layer)
        if key in self.copies:
            return self.copies[key]
        if key in self.plan.drop:
            new = _identity
        elif is_rebuildable_model(layer):
            new = self.model(layer)
        else:
            config = layer.get_config()
            if key in self.plan.force_bias:
                config["use_bias"] = True
            new = type(layer).from_config(config)
            weights = self.plan.new_weights.get(key)
            self.pending.append((new, weights if weights is not None else layer.get_weights()))
        self.copies[key] = new
        return new

    def _new_inputs(self, graph):
        new = []
        for tensor in graph.inputs:
            input_layer = tensor._keras_history.operation
            new.append(
                keras.Input(
                    batch_shape=tensor.shape,
                    dtype=tensor.dtype,
                    sparse=getattr(tensor, "sparse", False),
                    name=input_layer.name,
                )
            )
        return new

    def model(self, model: keras.Model) -> keras.Model:
        graph = graph_of(model)
        inputs = self._new_inputs(graph)
        if isinstance(model, keras.Sequential):
            layers = [self.copy_layer(layer) for layer in model.layers]
            layers = [layer for layer in layers if layer is not _identity]
            new = keras.Sequential([inputs[0]._keras_history.operation, *layers],
                                   name=model.name, trainable=model.trainable)
        else:
            # The inputs in the original's structure (list, dict or single tensor).
            packed = keras.tree.pack_sequence_as(graph._inputs_struct, inputs)
            outputs = graph._run_through_graph(packed, operation_fn=self.copy_layer)
            new = keras.Model(packed, outputs, name=model.name, trainable=model.trainable)
        self._assign_weights()
        return new

    def _assign_weights(self):
        for layer, weights in self.pending:
            layer.set_weights(weights)
        self.pending.clear()


def rebuild(model: keras.Model, plan: RebuildPlan) -> keras.Model:
    """A new model with the plan applied; `model` itself is never changed.

    Layers are copied from objects already in memory, not from an untrusted file: the
    choice of safe mode was made when `model` was loaded, so a Lambda layer that is
    here may be copied (safe mode off for the copy only).
    """
    from keras.src.saving.serialization_lib import SafeModeScope

    with SafeModeScope(False):
        return _Rebuilder(plan).model(model)
