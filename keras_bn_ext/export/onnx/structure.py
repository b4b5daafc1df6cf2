"""Convert the graph, not the weights: tf2onnx on the model's structure, weights attached after.

tf2onnx on a function that captures the model's variables freezes them into a GraphDef
(a copy), runs TensorFlow's grappler on it (copies) and then its own ONNX optimizers,
which convert every constant between protobuf and numpy again and again: on ResNet50
(25.6 M parameters, 102 MB) the conversion peaks at ~7 GB and takes ~20 s, ~260 bytes
and ~1 s per million parameters, almost all of it in tf2onnx's constant handling.

Here the model is traced with its weights as function inputs (`model.stateless_call`),
so tf2onnx converts only the structure (no constant bigger than a shape); the weights
then enter the ONNX graph as inputs that feed a few weight-only nodes (kernel
Transposes, bias Reshapes and Squeezes: the transforms tf2onnx would have applied to
constants). Those weight-only nodes are evaluated by onnx's reference evaluator, one
connected group at a time, on the Keras variables' values, and their results become the
initializers. Vectors and small matrices are frozen as tf2onnx freezes them (see
`MIN_INPUT_SIZE`), so every rewrite that depends on constants is made as today. What is
left is the graph users get from tf2onnx with frozen weights (the same operations, bit
for bit the same outputs on the models measured), at a small multiple of the weights' size.

Initializers are made one at a time (`attach_weights` takes a tensor maker), so a caller
can stream them to an external-data file instead of holding a protobuf over 2 GB.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Callable

import keras
import numpy as np

from keras_bn_ext import _keras_internals as internals
from keras_bn_ext.compare import input_specs, output_names
from keras_bn_ext.errors import ExportError

__all__ = ["MIN_INPUT_SIZE", "WEIGHT_PREFIX", "Structure", "to_onnx_structure", "attach_weights"]

WEIGHT_PREFIX = "keras_bn_ext_weight_"  # the weight inputs' names while the structure is converted
# Weights of rank >= 2 with at least this many elements (kernels, embeddings: the bulk of
# any model) travel as inputs; vectors and small matrices (biases, BN statistics, scales)
# are frozen as tf2onnx freezes them, so every constant-dependent rewrite TensorFlow and
# tf2onnx make on them (a depthwise conv fused with its bias, BN arithmetic folded,
# transposes pushed through per-channel constants, a zero bias dropped) is made as today.
MIN_INPUT_SIZE = 1 << 16


@dataclass
class Structure:
    """The converted structure: an ONNX graph whose weight inputs are still unbound."""

    proto: object  # onnx.ModelProto
    function: object  # the traced tf.function (for captured constants)
    weights: dict[str, object]  # weight input name -> the Keras variable it stands for
    input_names: list[str]  # the model's inputs


def to_onnx_structure(model: keras.Model, *, opset: int, batch_size: int | None) -> Structure:
    """tf2onnx on `model` traced with its weights as inputs (`model.stateless_call`)."""
    import tensorflow as tf
    import tf2onnx

    from keras_bn_ext.export.onnx import handlers

    handlers.register()  # this project's tf2onnx handlers (Erfc, Expm1, Where kept, ...)

    specs = [tf.TensorSpec((batch_size,) + tuple(shape[1:]), tf.as_dtype(dtype), name=name)
             for name, shape, dtype in input_specs(model)]
    trainable, non_trainable = list(model.trainable_variables), list(model.non_trainable_variables)
    variables = trainable + non_trainable
    as_input = [len(v.shape) >= 2 and int(np.prod(v.shape)) >= MIN_INPUT_SIZE for v in variables]
    weights = {f"{WEIGHT_PREFIX}{i}": v for i, v in enumerate(variables) if as_input[i]}
    weight_specs = [tf.TensorSpec(tuple(v.shape), tf.as_dtype(v.dtype), name=n) for n, v in weights.items()]
    names = output_names(model)
    n_inputs, n_trainable = len(specs), len(trainable)

    def forward(*args):
        x = list(args[:n_inputs]) if n_inputs > 1 else args[0]
        fed = iter(args[n_inputs:])
        # Small weights are read from their variables: tf2onnx freezes them as it always does.
        values = [next(fed) if big else tf.convert_to_tensor(v.value) for v, big in zip(variables, as_input)]
        out, _ = model.stateless_call(values[:n_trainable], values[n_trainable:], x, training=False)
        return dict(zip(names, keras.tree.flatten(out)))

    function = tf.function(forward, input_signature=specs + weight_specs, autograph=False)
    try:
        with internals.traceable_convolutions():
            proto, _ = tf2onnx.convert.from_function(function, input_signature=specs + weight_specs, opset=opset)
    except Exception as exc:  # tf2onnx raises whatever its handlers raise
        raise ExportError(f"tf2onnx could not convert the model: {type(exc).__name__}: {exc}") from exc
    return Structure(proto=proto, function=function, weights=weights, input_names=[s.name for s in specs])


def _weight_only_groups(graph, weight_names: set[str]) -> tuple[list[list], set[str]]:
    """The nodes computed from weights and initializers alone, in connected groups (in
    graph order), and the tensors they produce."""
    constant = set(weight_names) | {t.name for t in graph.initializer}
    nodes = []
    for node in graph.node:
        if node.input and all(not x or x in constant for x in node.input) and node.op_type not in _NOT_FOLDED:
            nodes.append(node)
            constant.update(node.output)
    # Union the nodes sharing a tensor (other than small initializers, which any may share).
    initializers = {t.name for t in graph.initializer}
    parent = list(range(len(nodes)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for x in list(node.input) + list(node.output):
            if not x or x in initializers:
                continue
            if x in owner:
                parent[find(i)] = find(owner[x])
            else:
                owner[x] = i
    groups: dict[int, list] = collections.defaultdict(list)
    for i, node in enumerate(nodes):
        groups[find(i)].append(node)
    return list(groups.values()), constant


# Ops never folded: their result is not a function of the weights alone.
_NOT_FOLDED = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


def attach_weights(structure: Structure, to_tensor: Callable[[str, np.ndarray], object] | None = None) -> None:
    """Replace the structure's weight inputs by the values they compute into.

    Each connected group of weight-only nodes is evaluated (onnx's reference evaluator)
    on the Keras variables' values; every tensor of the group used outside it becomes
    an initializer of that name, made by `to_tensor(name, array)` one at a time (default
    `onnx.numpy_helper.from_array`; an external-data writer streams the bytes to its file
    and returns a tensor pointing there). The group's nodes and the weight inputs leave the
    graph. A weight used directly by a graph node is attached as it is, under its name.
    """
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    graph = structure.proto.graph
    make = to_tensor or (lambda name, array: numpy_helper.from_array(array, name))

    def sink(name, array):
        graph.initializer.append(make(name, array))

    weight_names = set(structure.weights)
    groups, constant = _weight_only_groups(graph, weight_names)
    folded = {id(n) for group in groups for n in group}
    used_outside: set[str] = set()
    for node in graph.node:
        if id(node) not in folded:
            used_outside.update(x for x in node.input if x in constant)
    used_outside.update(o.name for o in graph.output if o.name in constant)
    initializers = {t.name: t for t in graph.initializer}
    opsets = list(structure.proto.opset_import)

    def value(name) -> np.ndarray:
        return np.asarray(structure.weights[name].numpy())

    for group in groups:
        inputs = sorted({x for n in group for x in n.input if x in weight_names})
        outputs = [x for n in group for x in n.output if x in used_outside]
        if not outputs:
            continue
        inits = [initializers[x] for x in sorted({x for n in group for x in n.input if x in initializers})]
        sub = helper.make_model(
            helper.make_graph(list(group), "weights",
                              [helper.make_tensor_value_info(
                                  x, helper.np_dtype_to_tensor_dtype(np.dtype(structure.weights[x].dtype)), None)
                               for x in inputs],
                              [helper.make_tensor_value_info(x, 0, None) for x in outputs], inits),
            opset_imports=opsets, ir_version=structure.proto.ir_version)
        results = ReferenceEvaluator(sub).run(None, {x: value(x) for x in inputs})
        for name, array in zip(outputs, results):
            sink(name, np.ascontiguousarray(array))
        del results
    for name in sorted(used_outside & weight_names):  # a weight read as it is
        sink(name, value(name))
    keep = [n for n in graph.node if id(n) not in folded]
    del graph.node[:]
    graph.node.extend(keep)
    unbound = [i for i in graph.input if i.name in weight_names]
    for graph_input in unbound:
        graph.input.remove(graph_input)
    # Initializers only the folded nodes read (shapes, perms) are no longer needed.
    still_read = {x for n in graph.node for x in n.input} | {o.name for o in graph.output}
    for tensor in [t for t in graph.initializer if t.name not in still_read and t.name in initializers]:
        graph.initializer.remove(tensor)
