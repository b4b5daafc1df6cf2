"""The Functional graph behind a Keras model, and how its tensors connect: the machinery
folding, equalization, recalibration, reading and comparing models share (below all of
them: it imports nothing of this package but `_keras_internals` and `errors`)."""

from __future__ import annotations

import keras

from keras_bn_ext import _keras_internals as internals
from keras_bn_ext.errors import UnsupportedModelError

__all__ = ["GraphIndex", "graph_of", "is_rebuildable_model", "single_path_consumer"]


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
            if internals.node_operation(node) is not None and not internals.node_is_input(node):
                self.calls[id(internals.node_operation(node))] = self.calls.get(id(internals.node_operation(node)), 0) + 1
            for tensor in internals.node_inputs(node):
                self.consumers.setdefault(id(tensor), []).append(node)
        self.output_ids = {id(t) for t in graph.outputs}
        self.dict_outputs = isinstance(internals.outputs_struct(graph), dict)

    def n_consumers(self, tensor) -> int:
        return len(self.consumers.get(id(tensor), []))


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
        user = internals.node_operation(users[0])
        if g.calls.get(id(user), 0) > 1:
            return None, [], f"'{user.name}' ({type(user).__name__}) is shared"
        if not passes(user, users[0]):
            return user, through, None
        through.append(user)
        tensor = internals.node_outputs(users[0])[0]
