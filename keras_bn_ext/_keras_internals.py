"""Every use of Keras's private API, in one place.

Keras 3 has no public API to walk a Functional graph node by node or to replay it
with replaced operations, which is what folding needs. Each function here says why the
public API does not serve. Tested with the Keras versions in pyproject.toml
(`keras>=3.8,<4`); when Keras changes one of these, this is the only module to mend.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from typing import Callable, Iterator

import keras

__all__ = [
    "functional_graph",
    "is_functional",
    "graph_nodes",
    "node_operation",
    "node_is_input",
    "node_inputs",
    "node_outputs",
    "node_call_args",
    "node_call_kwargs",
    "producer_of",
    "inputs_struct",
    "outputs_struct",
    "run_through_graph",
    "in_inference",
    "standardized_inputs",
    "all_sublayers",
    "layer_tree",
    "lambda_output_shape",
    "concatenate_axis",
    "unsafe_deserialization",
    "traceable_convolutions",
    "forget_build_shapes",
]


def is_functional(model) -> bool:
    """True for a Functional model. `keras.Model` is the base of both Functional and
    subclassed models; only the private class tells them apart."""
    from keras.src.models.functional import Functional

    return isinstance(model, Functional)


def functional_graph(model):
    """The Functional graph behind a Sequential model (None before it has an input).
    Sequential builds it privately; `model.inputs`/`outputs` alone cannot be replayed."""
    return getattr(model, "_functional", None)


def graph_nodes(graph) -> list:
    """The graph's nodes, inputs first (deepest depth first). `model.operations` lists
    operations, not their calls: a shared layer has one entry but several nodes."""
    by_depth = graph._nodes_by_depth
    return [node for depth in sorted(by_depth, reverse=True) for node in by_depth[depth]]


# A Node's parts. `keras.src.ops.node.Node` is not public API: every read of its attributes
# is here, so a Keras change breaks one module.
def node_operation(node):
    """The layer or operation a node calls (None for some input nodes)."""
    return node.operation


def node_is_input(node) -> bool:
    return node.is_input


def node_inputs(node) -> list:
    """The symbolic tensors the node's call takes, flattened."""
    return node.input_tensors


def node_outputs(node) -> list:
    return node.output_tensors


def node_call_args(node) -> tuple:
    """Positional arguments of one call (tensors in their structure); no public accessor."""
    return node.arguments.args


def node_call_kwargs(node) -> dict:
    """Keyword arguments of one call (e.g. `training=True`); no public accessor."""
    return node.arguments.kwargs


def producer_of(tensor):
    """The operation (layer or op) that produced a symbolic KerasTensor; the public
    API has no tensor -> producer lookup."""
    return tensor._keras_history.operation


def inputs_struct(graph):
    """The inputs in the structure the model was built with (list, dict or a tensor);
    `model.inputs` is always flattened."""
    return graph._inputs_struct


def outputs_struct(graph):
    """The outputs in the structure the model was built with (a dict keeps its keys);
    `model.outputs` is always flattened."""
    return graph._outputs_struct


def run_through_graph(graph, inputs, operation_fn: Callable):
    """Replay the graph on new symbolic inputs, calling `operation_fn(op)` for the
    operation of each node. `keras.models.clone_model(call_function=...)` is the public
    equivalent, but it refuses Sequential models, renames input layers, and returns a
    list named after the previous layer when a skipped BN produced a dict output."""
    return graph._run_through_graph(inputs, operation_fn=operation_fn)


def in_inference(operation):
    """`operation` as a Functional model's call(training=False) runs it: the training flag
    injected where its call() takes one. Keras does this with a private helper of its
    functional module; replaying a graph with `run_through_graph` needs the same."""
    from keras.src.models.functional import operation_fn

    return operation_fn(operation, training=False)


def standardized_inputs(graph, inputs):
    """The inputs in the flat order the graph's input tensors have, converted as
    Functional.call converts them (dtype, dict keys, a single tensor)."""
    return graph._standardize_inputs(inputs)


def all_sublayers(model) -> list:
    """Every layer inside `model`, at any depth, including those a custom layer holds
    as attributes (which the graph does not show). `model.layers` is one level only."""
    return list(model._flatten_layers(include_self=False, recursive=True))


def layer_tree(layer) -> list:
    """`layer` and every layer inside it, in the order keras.saving walks them to save and
    load their own variables (`save_own_variables`/`load_own_variables`). The public
    `layer.layers` exists on models only, and one level deep."""
    return list(layer._flatten_layers(include_self=True, recursive=True))


def lambda_output_shape(layer):
    """The `output_shape` a Lambda layer was made with (None, a shape or a function): it
    keeps it privately, and its config holds only a serialized form."""
    return layer._output_shape


def concatenate_axis(op) -> int | None:
    """The axis a `keras.layers.Concatenate` layer or a `keras.ops.concatenate` call joins
    (None for anything else). The operation's class is not public API."""
    from keras.src.ops.numpy import Concatenate as ConcatenateOp

    if isinstance(op, (keras.layers.Concatenate, ConcatenateOp)):
        return int(op.axis)
    return None


def forget_build_shapes(layer) -> None:
    """Make `layer.get_build_config()` return None, so a saved Functional model holds no
    build config for it and Keras builds it by calling it while it rebuilds the graph
    at load time. Layer keeps the shapes its build() saw in this private dict; there is
    no public way to save a layer without them."""
    layer._build_shapes_dict = None


def unsafe_deserialization() -> AbstractContextManager:
    """Safe mode off while copying layers that are already in memory (a Lambda layer
    loaded with --unsafe). `keras.config.enable_unsafe_deserialization()` would turn it
    off for the whole process, for good."""
    from keras.src.saving.serialization_lib import SafeModeScope

    return SafeModeScope(False)


@contextmanager
def traceable_convolutions() -> Iterator[None]:
    """While tracing a model for tf2onnx, run grouped (and NCDHW) convolutions as a plain
    `tf.nn.convolution`, which tf2onnx turns into an ONNX Conv with `group`.

    Keras's TensorFlow backend wraps them in an XLA-compiled `tf.function` (TensorFlow's
    CPU kernels lack them) that tf2onnx leaves unconverted as StatefulPartitionedCall.
    No public API chooses the implementation; the function `keras.ops.conv` dispatches
    to is swapped for the block only, and only on the TensorFlow backend. The traced
    graph is never executed by TensorFlow, only converted.
    """
    if keras.backend.backend() != "tensorflow":
        yield
        return
    import tensorflow as tf
    from keras.src.backend.tensorflow import nn as tf_nn

    original = tf_nn.conv

    def conv(inputs, kernel, strides=1, padding="valid", data_format=None, dilation_rate=1):
        data_format = (data_format or keras.config.image_data_format()).lower()
        channels = inputs.shape[-1] if data_format == "channels_last" else inputs.shape[1]
        rank = len(inputs.shape)
        if channels == kernel.shape[-2] and not (data_format == "channels_first" and rank == 5):
            return original(inputs, kernel, strides, padding, data_format, dilation_rate)
        layout = {3: "WC", 4: "HWC", 5: "DHWC"}[rank]
        layout = "N" + (layout if data_format == "channels_last" else layout[-1] + layout[:-1])

        def convolution(x, w):
            return tf.nn.convolution(x, w, strides, padding.upper(), data_format=layout,
                                     dilations=dilation_rate)

        groups = channels // kernel.shape[-2]
        if rank == 5 and groups > 1:
            # tf2onnx infers `group` for 1-D/2-D convolutions only: one Conv per group.
            axis = -1 if data_format == "channels_last" else 1
            pieces = zip(tf.split(inputs, groups, axis=axis), tf.split(kernel, groups, axis=-1))
            return tf.concat([convolution(x, w) for x, w in pieces], axis=axis)
        return convolution(inputs, kernel)

    tf_nn.conv = conv
    try:
        yield
    finally:
        tf_nn.conv = original
