"""Graph analysis: which BatchNormalization layers of a Functional/Sequential model can
be folded into a neighbouring layer, in which direction, and why the others cannot.

What a layer class allows comes from `rules.RULES`; this module only reads the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras

from keras_bn_ext import _keras_internals as internals
from keras_bn_ext.errors import UnsupportedModelError
from keras_bn_ext.folding.affine import bn_axis, is_batchnorm, is_batchnorm_call
from keras_bn_ext.folding.rules import describe, rule_for, unwrap, why_not_target

__all__ = ["BNDecision", "GraphIndex", "analyze", "graph_of", "is_rebuildable_model", "single_path_consumer"]


@dataclass
class BNDecision:
    """One BatchNormalization layer of the graph and what to do with it."""

    bn: keras.layers.Layer
    path: str  # name, prefixed by the names of the models it is nested in
    into: keras.layers.Layer | None = None  # the layer it folds into
    reason: str | None = None  # why it is kept (None when folded)
    direction: str = "backward"  # backward: producer -> BN; forward: BN -> consumer
    through: tuple = ()  # forward only: Dropout/Flatten layers between BN and consumer
    feature_shape: tuple = ()  # forward only: the BN output's shape without the batch
    keeps_name: bool = False  # backward only: the BN names a model output; an Identity keeps it

    @property
    def folded(self) -> bool:
        return self.into is not None


def graph_of(model: keras.Model):
    """The Functional graph behind a Functional or Sequential model."""
    if isinstance(model, keras.Sequential):
        functional = internals.functional_graph(model)
        if functional is None:
            raise UnsupportedModelError(
                f"Sequential model '{model.name}' has no defined input shape; build it "
                "with keras.Input(...) first"
            )
        return functional
    if internals.is_functional(model):
        return model
    raise UnsupportedModelError(
        f"model '{model.name}' is a subclassed {type(model).__name__}: its call() is "
        "Python code that cannot be rebuilt with folded weights; build it as a "
        "Functional or Sequential model"
    )


def is_rebuildable_model(layer) -> bool:
    return isinstance(layer, keras.Sequential) or (
        isinstance(layer, keras.Model) and internals.is_functional(layer)
    )


class GraphIndex:
    """Call counts and consumers of every tensor of one Functional graph (folding's
    analysis, the inliner and `testing.residual_branch_batchnorms` read it)."""

    def __init__(self, graph):
        self.nodes = internals.graph_nodes(graph)
        self.calls: dict[int, int] = {}
        self.consumers: dict[int, list] = {}
        for node in self.nodes:
            if node.operation is not None and not node.is_input:
                self.calls[id(node.operation)] = self.calls.get(id(node.operation), 0) + 1
            for tensor in node.input_tensors:
                self.consumers.setdefault(id(tensor), []).append(node)
        self.output_ids = {id(t) for t in graph.outputs}
        self.dict_outputs = isinstance(internals.outputs_struct(graph), dict)

    def n_consumers(self, tensor) -> int:
        return len(self.consumers.get(id(tensor), []))


def analyze(model: keras.Model, *, exclude=frozenset(), prefix: str = "",
            opaque: dict[int, str] | None = None) -> list[BNDecision]:
    """Decide for every BN node of `model` (and of models nested in it) whether it folds.
    `opaque`: id(custom layer) -> why its call() could not be replaced by its graph."""
    opaque = opaque or {}
    g = GraphIndex(graph_of(model))
    decisions: list[BNDecision] = []
    seen: set[int] = set()  # models and custom layers already visited (shared ones once)
    for node in g.nodes:
        op = node.operation
        if op is None or node.is_input:
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
        decision.reason = _bn_blocker(op, node, g, exclude)
        if decision.reason is None:
            decision.reason = _backward_blocker(op, node, g)
            if decision.reason is None:
                decision.into = internals.producer_of(node.input_tensors[0])
                # A model output is named after the layer that produces it (dict keys
                # aside): the folded BN leaves an Identity under its name behind.
                decision.keeps_name = not g.dict_outputs and any(
                    id(t) in g.output_ids for t in node.output_tensors)
            else:
                target, through, forward_reason = _forward_target(op, node, g)
                if forward_reason is None:
                    decision.into, decision.through, decision.direction = target, through, "forward"
                    decision.feature_shape = tuple(node.output_tensors[0].shape[1:])
                    decision.reason = None
                else:
                    decision.reason += f"; no exact forward fold: {forward_reason}"
        decisions.append(decision)
    return decisions


def _hidden_batchnorms(layer, prefix: str, why: str | None = None) -> list[BNDecision]:
    """BNs held inside a custom layer (or a subclassed model): Keras records no node for
    them in this graph, so they are listed as kept, never silently left out."""
    where = f"inside custom layer '{layer.name}' ({type(layer).__name__})"
    reason = f"{where}: not replaced by its graph: {why}" if why else f"{where}: its call() is opaque to the graph"
    return [
        BNDecision(bn=inner, path=f"{prefix}{layer.name}/{inner.name}", reason=reason)
        for inner in internals.all_sublayers(layer)
        if is_batchnorm(inner)
    ]


def _bn_blocker(bn, node, g: GraphIndex, exclude) -> str | None:
    """Reasons that rule out folding this BN in either direction."""
    if bn.name in exclude:
        return "excluded by the caller"
    if g.calls[id(bn)] > 1:
        return f"the BN layer is shared (called {g.calls[id(bn)]} times)"
    if internals.node_call_kwargs(node).get("training") is True:
        return "called with training=True (always batch statistics)"
    if len(node.input_tensors) != 1:
        return "the BN takes several input tensors"
    return None


def _backward_blocker(bn, node, g: GraphIndex) -> str | None:
    """Why the BN cannot fold into the layer that feeds it, or None."""
    tensor = node.input_tensors[0]
    producer = internals.producer_of(tensor)
    pname = describe(producer)
    if rule_for(producer) is None:
        return f"its input comes from {pname}, not a conv/dense layer"
    reason = why_not_target(producer)
    if reason is not None:
        return f"producer {pname} {reason}"
    if g.calls[id(producer)] > 1:
        return f"producer {pname} is shared (called {g.calls[id(producer)]} times)"
    act = keras.activations.serialize(unwrap(producer).activation)
    if act != "linear":
        return f"producer {pname} has activation '{act}' before the BN"
    if g.n_consumers(tensor) > 1:
        return f"the output of {pname} also feeds other layers"
    if id(tensor) in g.output_ids:
        return f"the output of {pname} is also a model output"
    rank = len(tensor.shape)
    channel = rule_for(producer).output_axis(producer, rank)
    if bn_axis(bn, rank) != channel:
        return f"BN axis {bn_axis(bn, rank)} is not the channel axis ({channel}) of {pname}"
    return None


_PASS_THROUGH = (keras.layers.Dropout, keras.layers.Flatten)  # identity in inference / a reshape


def single_path_consumer(tensor, g: GraphIndex, passes):
    """Follow `tensor` through layers that `passes(op, node)` accepts, each the only
    consumer of the one before, to the first layer it does not accept. Returns
    `(layer, [accepted layers], None)`, or `(None, [], reason)` when the path forks, reaches
    a model output or a shared layer (equalization walks this path too)."""
    through = []
    while True:
        if id(tensor) in g.output_ids:
            return None, [], "its output is a model output"
        users = g.consumers.get(id(tensor), [])
        if len(users) != 1:
            return None, [], f"its output feeds {len(users)} layers"
        user = users[0].operation
        if g.calls.get(id(user), 0) > 1:
            return None, [], f"{describe(user)} is shared"
        if not passes(user, users[0]):
            return user, through, None
        through.append(user)
        tensor = users[0].output_tensors[0]


def _forward_target(bn, node, g: GraphIndex):
    """The layer that BN's output feeds, through Dropout/Flatten, if folding the BN into
    its input side is exact. Returns (target, through, None) or (None, (), reason)."""
    tensor = node.output_tensors[0]
    rank = len(tensor.shape)
    user, through, reason = single_path_consumer(tensor, g, lambda op, _node: type(op) in _PASS_THROUGH)
    if reason is not None:
        return None, (), reason
    uname = describe(user)
    flattened = any(isinstance(t, keras.layers.Flatten) for t in through)
    if flattened and any(d is None for d in node.output_tensors[0].shape[1:]):
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
    if bn_axis(bn, rank) != axis:
        what = "the last axis that" if axis == rank - 1 else f"the input channel axis ({axis}) of"
        return None, (), f"BN axis {bn_axis(bn, rank)} is not {what} {uname} reads"
    return user, tuple(through), None
