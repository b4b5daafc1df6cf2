"""Custom layers whose call() runs on symbolic tensors, replaced by their own graph.

A custom layer (a KerasHub block, say) is one node of the model's graph: the BNs it
holds are invisible to graph analysis. But Keras records a node for every layer and
operation called on symbolic tensors, so calling the layer's `call()` on a
`keras.Input` yields the Functional graph of what it computes, made of the very same
inner layers. Such a layer is replaced by that graph, as a nested Functional model
under the layer's name, and the BNs inside fold by the usual rules.

A layer is replaced only when the replacement is the same computation, as far as can be
checked without running it:

- it is called once in the model, on one tensor or one list/dict of tensors, with no
  mask and no `training=True`;
- its call() traces without error on a symbolic input of the same shape and dtype;
- the traced outputs have the shapes and dtypes the layer's node had;
- every weight the layer holds is a weight of some layer in the traced graph (a call()
  that computes with the layer's own variables through raw ops, or leaves a sublayer
  uncalled, is not replaced; a BN always holds weights, so every BN is called);
- every layer of the traced graph is recreated by its own config (one that its parent
  creates from non-serializable arguments, or whose get_config() its __init__ does
  not accept, could be saved only inside its parent).

Anything else stays as it is, its BNs kept with the reason. The whole fold is then
verified against the original model as always.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import keras

from keras_bn_ext import _keras_internals as internals
from keras_bn_ext.folding.affine import is_batchnorm
from keras_bn_ext.graph import GraphIndex, graph_of, is_rebuildable_model

__all__ = ["InlineReport", "inline_traceable_layers"]


@dataclass
class InlineReport:
    inlined: list[str] = field(default_factory=list)  # paths of the layers replaced by their graph
    not_traced: dict[int, str] = field(default_factory=dict)  # id(layer) -> why it stays opaque


def _is_custom_layer(op) -> bool:
    return (isinstance(op, keras.layers.Layer) and not is_rebuildable_model(op)
            and not isinstance(op, keras.Model) and type(op).__module__.split(".")[0] != "keras")


def _holds_batchnorm(layer) -> bool:
    return any(is_batchnorm(inner) for inner in internals.all_sublayers(layer))


def _trace(layer, node, calls: int) -> keras.Model:
    """The Functional graph of `layer.call` at this node; ValueError saying why not."""
    if calls > 1:
        raise ValueError("it is called more than once")
    args, kwargs = internals.node_call_args(node), internals.node_call_kwargs(node)
    if len(args) != 1:
        raise ValueError("it is called with more than one positional argument")
    flat = keras.tree.flatten(args[0])
    if [id(t) for t in flat] != [id(t) for t in internals.node_inputs(node)]:
        raise ValueError("its argument holds more than tensors")
    extra = {k: v for k, v in kwargs.items() if v is not None and not (k == "training" and v is False)}
    if extra:
        raise ValueError(f"it is called with {sorted(extra)}")
    # One tensor, or one list/dict of tensors (a feature pyramid's levels, say).
    names = sorted(args[0]) if isinstance(args[0], dict) and len(flat) == len(args[0]) else [None] * len(flat)
    symbolic = keras.tree.pack_sequence_as(  # a flat dict's inputs named by their keys, as Keras asks
        args[0], [keras.Input(batch_shape=t.shape, dtype=t.dtype, name=n) for t, n in zip(flat, names)])
    try:
        outputs = layer.call(symbolic)
        sub = keras.Model(symbolic, outputs, name=layer.name)
    except Exception as exc:  # noqa: BLE001 - whatever call() raises on a symbolic input
        first = (str(exc).strip().splitlines() or [""])[0][:120]
        raise ValueError(f"its call() does not trace symbolically ({type(exc).__name__}: {first})") from None
    traced, expected = keras.tree.flatten(outputs), internals.node_outputs(node)
    if len(traced) != len(expected) or any(
            tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype for a, b in zip(traced, expected)):
        raise ValueError("its traced outputs differ in shape or dtype from its node's")
    reached = {id(v) for v in sub.weights}
    sublayers = internals.all_sublayers(layer)
    of_sublayers = {id(v) for inner in sublayers for v in inner.weights}
    own = [v for v in layer.weights if id(v) not in of_sublayers and id(v) not in reached]
    if own:
        raise ValueError(f"its call() computes with {len(own)} variables of its own through raw operations")
    uncalled = [inner.name for inner in sublayers
                if inner.weights and not any(id(v) in reached for v in inner.weights)]
    if uncalled or not {id(v) for v in layer.weights} <= reached:
        names = ", ".join(uncalled[:3]) + (f" and {len(uncalled) - 3} more" if len(uncalled) > 3 else "")
        raise ValueError(f"its call() leaves sublayers holding weights uncalled ({names or 'some variables'}); "
                         "the graph would lose them")
    for inner in sub.layers:
        if is_rebuildable_model(inner) or type(inner) is keras.layers.Identity:
            continue  # the rebuild recreates these without their config
        try:
            with internals.unsafe_deserialization():  # as the rebuild copies it
                type(inner).from_config(inner.get_config())
        except Exception:  # noqa: BLE001 - NotImplementedError, TypeError, whatever it raises
            raise ValueError(f"layer '{inner.name}' ({type(inner).__name__}) in it is not recreated by its "
                             "config: outside its parent it could be neither copied nor saved") from None
    return sub


def _inline(model: keras.Model, report: InlineReport, prefix: str) -> keras.Model | None:
    """`model` with its traceable custom layers replaced (recursively), or None if none."""
    graph = graph_of(model)
    index = GraphIndex(graph)
    replacements: dict[int, keras.Model] = {}
    for node in index.nodes:
        op = internals.node_operation(node)
        if op is None or internals.node_is_input(node) or id(op) in replacements:
            continue
        if is_rebuildable_model(op):
            inner = _inline(op, report, f"{prefix}{op.name}/")
            if inner is not None:
                replacements[id(op)] = inner
        elif _is_custom_layer(op) and _holds_batchnorm(op):
            try:
                sub = _trace(op, node, index.calls[id(op)])
            except ValueError as exc:
                report.not_traced[id(op)] = str(exc)
                continue
            report.inlined.append(f"{prefix}{op.name} ({type(op).__name__})")
            replacements[id(op)] = _inline(sub, report, f"{prefix}{op.name}/") or sub
    if not replacements:
        return None
    if isinstance(model, keras.Sequential):  # stays a Sequential
        first = graph.inputs[0]
        start = keras.Input(batch_shape=first.shape, dtype=first.dtype, name=internals.producer_of(first).name)
        return keras.Sequential([internals.producer_of(start)]
                                + [replacements.get(id(layer), layer) for layer in model.layers],
                                name=model.name, trainable=model.trainable)
    inputs = [keras.Input(batch_shape=t.shape, dtype=t.dtype, name=internals.producer_of(t).name)
              for t in graph.inputs]
    packed = keras.tree.pack_sequence_as(internals.inputs_struct(graph), inputs)
    outputs = internals.run_through_graph(graph, packed, operation_fn=lambda op: replacements.get(id(op), op))
    return keras.Model(packed, outputs, name=model.name, trainable=model.trainable)


def inline_traceable_layers(model: keras.Model) -> tuple[keras.Model, InlineReport]:
    """`model`, or an equivalent Functional model in which each custom layer that holds
    BNs and whose call() traces symbolically is a nested Functional model of the same
    name. The new model shares its layers with `model` (nothing is copied or changed);
    fold it, and the rebuild copies them."""
    report = InlineReport()
    inlined = _inline(model, report, "")
    return (inlined if inlined is not None else model), report
