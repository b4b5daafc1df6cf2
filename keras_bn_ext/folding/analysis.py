"""Graph analysis: which BatchNormalization layers of a Functional/Sequential model can
be folded into a neighbouring layer, in which direction, and why the others cannot.

What a layer class allows comes from `rules.RULES`; this module only reads the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras

from keras_bn_ext import _keras_internals as internals
from keras_bn_ext.folding.affine import bn_axis, is_batchnorm, is_batchnorm_call
from keras_bn_ext.folding.rules import describe, rule_for, unwrap, why_not_target
from keras_bn_ext.graph import GraphIndex, graph_of, is_rebuildable_model, single_path_consumer

# Why a BN is kept, as stable codes beside the prose (reports, tools/zoo.py).
KEPT_CODES = {
    "excluded": "excluded by the caller",
    "bn_shared": "the BN layer is called more than once",
    "training_true": "called with training=True",
    "several_inputs": "the BN takes several input tensors",
    "input_not_conv_dense": "its input is not a conv/dense layer (Add, Concatenate, an activation, an input)",
    "producer_unsupported": "the producer is a conv/dense layer no fold handles (quantized, LoRA, its equation)",
    "producer_shared": "the producer is called more than once",
    "producer_activation": "the producer has a non-linear activation",
    "producer_output_shared": "the producer's output also feeds other layers",
    "producer_output_is_model_output": "the producer's output is also a model output",
    "axis_mismatch": "the BN axis is not the producer's channel axis",
    "inside_custom_layer": "inside a custom layer that could not be replaced by its graph",
    "opaque_layer": "inside a layer (or subclassed model) whose call() is opaque to the graph",
    "not_called": "held by the model but never called in its graph",
}

# GraphIndex, graph_of, is_rebuildable_model and single_path_consumer live in keras_bn_ext.graph.
__all__ = ["KEPT_CODES", "BNDecision", "analyze"]


@dataclass
class BNDecision:
    """One BatchNormalization layer of the graph and what to do with it."""

    bn: keras.layers.Layer
    path: str  # name, prefixed by the names of the models it is nested in
    into: keras.layers.Layer | None = None  # the layer it folds into
    reason: str | None = None  # why it is kept (None when folded)
    code: str | None = None  # the rule that keeps it, stable (KEPT_CODES)
    direction: str = "backward"  # backward: producer -> BN; forward: BN -> consumer
    through: tuple = ()  # forward only: Dropout/Flatten layers between BN and consumer
    feature_shape: tuple = ()  # forward only: the BN output's shape without the batch
    keeps_name: bool = False  # backward only: the BN names a model output; an Identity keeps it
    # Backward through a Concatenate (`into` is the Concatenate): (producer, first channel,
    # end channel) for each of its inputs, each folded with its slice of the BN's channels.
    slices: tuple = ()

    @property
    def folded(self) -> bool:
        return self.into is not None


def analyze(model: keras.Model, *, exclude=frozenset(), prefix: str = "",
            opaque: dict[int, str] | None = None) -> list[BNDecision]:
    """Decide for every BN node of `model` (and of models nested in it) whether it folds.
    `opaque`: id(custom layer) -> why its call() could not be replaced by its graph."""
    opaque = opaque or {}
    g = GraphIndex(graph_of(model))
    decisions: list[BNDecision] = []
    seen: set[int] = set()  # models and custom layers already visited (shared ones once)
    for node in g.nodes:
        op = internals.node_operation(node)
        if op is None or internals.node_is_input(node):
            continue
        if is_rebuildable_model(op):
            if id(op) not in seen:
                seen.add(id(op))
                decisions += analyze(op, exclude=exclude, prefix=f"{prefix}{op.name}/", opaque=opaque)
            continue
        if not is_batchnorm_call(op):
            if isinstance(op, keras.layers.Layer) and id(op) not in seen:
                seen.add(id(op))
                decisions += _hidden_batchnorms(op, prefix, opaque.get(id(op)))
            continue
        decision = BNDecision(bn=op, path=prefix + op.name)
        blocked = _bn_blocker(op, node, g, exclude)
        if blocked is None:
            blocked = _backward_blocker(op, node, g)
            slices, concat_reason = _concat_slices(op, node, g) if blocked and blocked[0] == "input_not_conv_dense" \
                else ((), None)
            if slices:
                decision.into, decision.slices = internals.producer_of(internals.node_inputs(node)[0]), slices
                decision.keeps_name = not g.dict_outputs and any(
                    id(t) in g.output_ids for t in internals.node_outputs(node))
            elif blocked is None:
                decision.into = internals.producer_of(internals.node_inputs(node)[0])
                # A model output is named after the layer that produces it (dict keys
                # aside): the folded BN leaves an Identity under its name behind.
                decision.keeps_name = not g.dict_outputs and any(
                    id(t) in g.output_ids for t in internals.node_outputs(node))
            else:
                target, through, forward_reason = _forward_target(op, node, g)
                if forward_reason is None:
                    decision.into, decision.through, decision.direction = target, through, "forward"
                    decision.feature_shape = tuple(internals.node_outputs(node)[0].shape[1:])
                else:
                    concat = f"; not per slice: {concat_reason}" if concat_reason else ""
                    decision.code, decision.reason = blocked[0], (
                        f"{blocked[1]}{concat}; no exact forward fold: {forward_reason}")
        else:
            decision.code, decision.reason = blocked
        decisions.append(decision)
    return decisions


def _hidden_batchnorms(layer, prefix: str, why: str | None = None) -> list[BNDecision]:
    """BNs held inside a custom layer (or a subclassed model): Keras records no node for
    them in this graph, so they are listed as kept, never silently left out."""
    where = f"inside custom layer '{layer.name}' ({type(layer).__name__})"
    reason = f"{where}: not replaced by its graph: {why}" if why else f"{where}: its call() is opaque to the graph"
    code = "inside_custom_layer" if why else "opaque_layer"
    return [
        BNDecision(bn=inner, path=f"{prefix}{layer.name}/{inner.name}", reason=reason, code=code)
        for inner in internals.all_sublayers(layer)
        if is_batchnorm(inner)
    ]


def _bn_blocker(bn, node, g: GraphIndex, exclude) -> str | None:
    """Reasons that rule out folding this BN in either direction."""
    if bn.name in exclude:
        return "excluded", "excluded by the caller"
    if g.calls[id(bn)] > 1:
        return "bn_shared", f"the BN layer is shared (called {g.calls[id(bn)]} times)"
    if internals.node_call_kwargs(node).get("training") is True:
        return "training_true", "called with training=True (always batch statistics)"
    if len(internals.node_inputs(node)) != 1:
        return "several_inputs", "the BN takes several input tensors"
    return None


def _backward_blocker(bn, node, g: GraphIndex) -> str | None:
    """Why the BN cannot fold into the layer that feeds it, or None."""
    tensor = internals.node_inputs(node)[0]
    return _producer_blocker(tensor, bn_axis(bn, len(tensor.shape)), g)


def _producer_blocker(tensor, axis: int, g: GraphIndex):
    """Why an affine map on channel `axis` of `tensor` cannot fold into its producer, or None."""
    producer = internals.producer_of(tensor)
    pname = describe(producer)
    if rule_for(producer) is None:
        return "input_not_conv_dense", f"its input comes from {pname}, not a conv/dense layer"
    reason = why_not_target(producer)
    if reason is not None:
        return "producer_unsupported", f"producer {pname} {reason}"
    if g.calls[id(producer)] > 1:
        return "producer_shared", f"producer {pname} is shared (called {g.calls[id(producer)]} times)"
    act = keras.activations.serialize(unwrap(producer).activation)
    if act != "linear":
        return "producer_activation", f"producer {pname} has activation '{act}' before the BN"
    if g.n_consumers(tensor) > 1:
        return "producer_output_shared", f"the output of {pname} also feeds other layers"
    if id(tensor) in g.output_ids:
        return "producer_output_is_model_output", f"the output of {pname} is also a model output"
    rank = len(tensor.shape)
    channel = rule_for(producer).output_axis(producer, rank)
    if axis != channel:
        return "axis_mismatch", f"BN axis {axis} is not the channel axis ({channel}) of {pname}"
    return None


def _concat_slices(bn, node, g: GraphIndex):
    """A BN after a Concatenate on its channel axis folds slice by slice into the layers
    that feed the Concatenate, when each of them could take a BN of its own: exact, since
    BN is per channel. Returns ((producer, start, end), ...) and None, or () and why not."""
    tensor = internals.node_inputs(node)[0]
    concat = internals.producer_of(tensor)
    joined = internals.concatenate_axis(concat)  # a Concatenate layer or keras.ops.concatenate
    if joined is None:
        return (), None
    name = describe(concat)
    rank = len(tensor.shape)
    axis = bn_axis(bn, rank)
    if g.calls[id(concat)] > 1:
        return (), f"{name} is shared"
    if g.n_consumers(tensor) > 1 or id(tensor) in g.output_ids:
        return (), f"the output of {name} also feeds other layers or is a model output"
    if joined % rank != axis:
        return (), f"{name} joins axis {joined % rank}, the BN normalizes axis {axis}"
    concat_node = next(n for n in g.nodes if any(t is tensor for t in internals.node_outputs(n)))
    slices, start = [], 0
    for part in internals.node_inputs(concat_node):
        blocked = _producer_blocker(part, axis, g)
        if blocked is not None:
            return (), f"input {describe(internals.producer_of(part))} of {name}: {blocked[1]}"
        width = part.shape[axis]
        if width is None:
            return (), f"an input of {name} has an unknown channel count"
        slices.append((internals.producer_of(part), start, start + width))
        start += width
    return tuple(slices), None


_PASS_THROUGH = (keras.layers.Dropout, keras.layers.Flatten)  # identity in inference / a reshape
# Averages within each channel: a per-channel affine map commutes with them exactly
# (mean(s*x + t) = s*mean(x) + t), so a BN before one folds into the layer after it.
# AveragePooling only without padding (padded windows average fewer values on some backends).
_GLOBAL_AVERAGES = (keras.layers.GlobalAveragePooling1D, keras.layers.GlobalAveragePooling2D,
                    keras.layers.GlobalAveragePooling3D)
_AVERAGES = _GLOBAL_AVERAGES + (keras.layers.AveragePooling1D, keras.layers.AveragePooling2D,
                                keras.layers.AveragePooling3D)


def _passes(op, _node) -> bool:
    if type(op) in _PASS_THROUGH:
        return True
    return type(op) in _AVERAGES and (type(op) in _GLOBAL_AVERAGES or op.padding == "valid")


def _forward_target(bn, node, g: GraphIndex):
    """The layer that BN's output feeds, through Dropout/Flatten, if folding the BN into
    its input side is exact. Returns (target, through, None) or (None, (), reason)."""
    tensor = internals.node_outputs(node)[0]
    rank = len(tensor.shape)
    user, through, reason = single_path_consumer(tensor, g, _passes)
    if reason is not None:
        return None, (), reason
    uname = describe(user)
    flattened = any(isinstance(t, keras.layers.Flatten) for t in through)
    averages = [t for t in through if type(t) in _AVERAGES]
    channel = bn_axis(bn, rank)
    for pool in averages:
        pool_channel = rank - 1 if pool.data_format == "channels_last" else 1
        if channel != pool_channel:
            return None, (), f"BN axis {channel} is not the channel axis of {describe(pool)}"
        if type(pool) in _GLOBAL_AVERAGES and not pool.keepdims:
            rank, channel = 2, 1  # (batch, channels)
    if averages and flattened:
        return None, (), "an average pooling and a Flatten both stand between it and the layer it feeds"
    if flattened and any(d is None for d in internals.node_outputs(node)[0].shape[1:]):
        return None, (), "its output has unknown dimensions before a Flatten"
    rule = rule_for(user)
    if rule is None or rule.input_axis is None:
        return None, (), f"it feeds {uname}, not a dense/conv layer it can fold into"
    reason = why_not_target(user) or rule.forward_blocker(user)
    if reason is not None:
        return None, (), f"{uname} {reason}"
    if flattened:
        if not rule.through_flatten:
            return None, (), f"{uname} follows a Flatten"
        return user, tuple(through), None
    axis = rule.input_axis(user, rank)
    if channel != axis:
        what = "the last axis that" if axis == rank - 1 else f"the input channel axis ({axis}) of"
        return None, (), f"BN axis {channel} is not {what} {uname} reads"
    return user, tuple(through), None
