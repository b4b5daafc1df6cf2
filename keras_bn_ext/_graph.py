"""Graph analysis: which BatchNormalization layers of a Functional/Sequential model can
be folded into their producer, and why the others cannot."""

from __future__ import annotations

from dataclasses import dataclass

import keras

from keras_bn_ext import _folding
from keras_bn_ext.errors import UnsupportedModelError


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

    @property
    def folded(self) -> bool:
        return self.into is not None


def graph_of(model: keras.Model):
    """The Functional graph behind a Functional or Sequential model."""
    if isinstance(model, keras.Sequential):
        functional = getattr(model, "_functional", None)
        if functional is None:
            raise UnsupportedModelError(
                f"Sequential model '{model.name}' has no defined input shape; build it "
                "with keras.Input(...) first"
            )
        return functional
    if _is_functional(model):
        return model
    raise UnsupportedModelError(
        f"model '{model.name}' is a subclassed {type(model).__name__}: its call() is "
        "Python code that cannot be rebuilt with folded weights; build it as a "
        "Functional or Sequential model"
    )


def _is_functional(model) -> bool:
    from keras.src.models.functional import Functional

    return isinstance(model, Functional)


def is_rebuildable_model(layer) -> bool:
    return isinstance(layer, keras.Sequential) or (
        isinstance(layer, keras.Model) and _is_functional(layer)
    )


def _nodes(graph):
    return [n for depth in sorted(graph._nodes_by_depth, reverse=True) for n in graph._nodes_by_depth[depth]]


def analyze(model: keras.Model, *, exclude=frozenset(), prefix: str = "") -> list[BNDecision]:
    """Decide for every BN node of `model` (and of models nested in it) whether it folds."""
    graph = graph_of(model)
    nodes = _nodes(graph)
    calls: dict[int, int] = {}
    consumers: dict[int, int] = {}
    consumer_nodes: dict[int, list] = {}
    for node in nodes:
        if node.operation is not None and not node.is_input:
            calls[id(node.operation)] = calls.get(id(node.operation), 0) + 1
        for tensor in node.input_tensors:
            consumers[id(tensor)] = consumers.get(id(tensor), 0) + 1
            consumer_nodes.setdefault(id(tensor), []).append(node)
    output_ids = {id(t) for t in graph.outputs}
    dict_outputs = isinstance(graph._outputs_struct, dict)

    decisions: list[BNDecision] = []
    seen_models: set[int] = set()
    for node in nodes:
        op = node.operation
        if op is None or node.is_input:
            continue
        if is_rebuildable_model(op):
            if id(op) not in seen_models:
                seen_models.add(id(op))
                decisions += analyze(op, exclude=exclude, prefix=f"{prefix}{op.name}/")
            continue
        if not _folding.is_batchnorm(op):
            continue
        decision = BNDecision(bn=op, path=prefix + op.name)
        decision.reason = _why_not(
            op, node, calls, consumers, output_ids, dict_outputs, exclude
        )
        if decision.reason is None:
            decision.into = node.input_tensors[0]._keras_history.operation
        elif not _bn_level(decision.reason):
            target, through, forward_reason = _forward_target(op, node, calls, consumer_nodes, output_ids)
            if forward_reason is None:
                decision.into, decision.through, decision.direction = target, through, "forward"
                decision.feature_shape = tuple(node.output_tensors[0].shape[1:])
                decision.reason = None
            else:
                decision.reason += f"; no exact forward fold: {forward_reason}"
        decisions.append(decision)
    return decisions


_BN_LEVEL_REASONS = ("excluded by the caller", "the BN layer is shared", "called with training=True",
                     "the BN takes several input tensors")


def _bn_level(reason: str) -> bool:
    """Reasons that rule out folding in either direction."""
    return reason.startswith(_BN_LEVEL_REASONS)


def _forward_target(bn, node, calls, consumer_nodes, output_ids):
    """The layer that BN's output feeds, through Dropout/Flatten, if folding the BN into
    its input side is exact. Returns (target, through, None) or (None, (), reason)."""
    tensor = node.output_tensors[0]
    rank = len(tensor.shape)
    through = []
    while True:
        if id(tensor) in output_ids:
            return None, (), "its output is a model output"
        users = consumer_nodes.get(id(tensor), [])
        if len(users) != 1:
            return None, (), f"its output feeds {len(users)} layers"
        user = users[0].operation
        uname = f"'{user.name}' ({type(user).__name__})"
        if calls.get(id(user), 0) > 1:
            return None, (), f"{uname} is shared"
        if type(user) in (keras.layers.Dropout, keras.layers.Flatten):
            through.append(user)
            tensor = users[0].output_tensors[0]
            continue
        break
    flattened = any(isinstance(t, keras.layers.Flatten) for t in through)
    if flattened and any(d is None for d in node.output_tensors[0].shape[1:]):
        return None, (), "its output has unknown dimensions before a Flatten"
    if type(user) not in _folding.FORWARD_TARGETS:
        return None, (), f"it feeds {uname}, not a dense/conv layer"
    if getattr(user, "quantization_mode", None):
        return None, (), f"{uname} is quantized"
    if isinstance(user, keras.layers.Dense):
        if not flattened and bn.axis % rank != rank - 1:
            return None, (), f"BN axis {bn.axis} is not the last axis that {uname} contracts"
        return user, tuple(through), None
    if flattened:
        return None, (), f"{uname} follows a Flatten"
    if user.padding != "valid":
        return None, (), f"{uname} pads its input (padding='{user.padding}'): border outputs would change"
    channel = rank - 1 if user.data_format == "channels_last" else 1
    if bn.axis % rank != channel:
        return None, (), f"BN axis {bn.axis} is not the input channel axis ({channel}) of {uname}"
    return user, tuple(through), None


def _why_not(bn, node, calls, consumers, output_ids, dict_outputs, exclude) -> str | None:
    if bn.name in exclude:
        return "excluded by the caller"
    if calls[id(bn)] > 1:
        return f"the BN layer is shared (called {calls[id(bn)]} times)"
    if node.arguments.kwargs.get("training") is True:
        return "called with training=True (always batch statistics)"
    if len(node.input_tensors) != 1:
        return "the BN takes several input tensors"
    tensor = node.input_tensors[0]
    producer = tensor._keras_history.operation
    pname = f"'{producer.name}' ({type(producer).__name__})"
    if not _folding.is_fold_target(producer):
        return f"its input comes from {pname}, not a conv/dense layer"
    if calls[id(producer)] > 1:
        return f"producer {pname} is shared (called {calls[id(producer)]} times)"
    if keras.activations.serialize(producer.activation) != "linear":
        act = keras.activations.serialize(producer.activation)
        return f"producer {pname} has activation '{act}' before the BN"
    if getattr(producer, "quantization_mode", None):
        return f"producer {pname} is quantized ({producer.quantization_mode})"
    if consumers.get(id(tensor), 0) > 1:
        return f"the output of {pname} also feeds other layers"
    if id(tensor) in output_ids:
        return f"the output of {pname} is also a model output"
    rank = len(tensor.shape)
    channel = _folding.output_channel_axis(producer, rank)
    if bn.axis % rank != channel:
        return (
            f"BN axis {bn.axis} is not the channel axis ({channel}) of {pname}"
        )
    if any(id(t) in output_ids for t in node.output_tensors) and not dict_outputs:
        return (
            "it produces a model output; folding would rename that output after "
            f"{pname} (outputs in a dict keep their keys and do fold)"
        )
    return None
