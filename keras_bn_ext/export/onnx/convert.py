"""`export_onnx`: a Keras model to an ONNX file through tf2onnx, folded first."""

from __future__ import annotations

import collections
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import keras

from keras_bn_ext import _keras_internals as internals
from keras_bn_ext.compare import input_specs, output_names
from keras_bn_ext.errors import ExportError, require_tensorflow_backend
from keras_bn_ext.export.onnx.guards import guard_pad_into_maxpool
from keras_bn_ext.export.onnx.options import BATCH_DIM, DEFAULT_OPSET, SUPPORTED_OPSETS
from keras_bn_ext.folding.fold import FoldReport, fold_batchnorms
from keras_bn_ext.model_io import atomic_output

__all__ = ["export_onnx", "to_onnx_proto", "ExportReport"]


@dataclass
class ExportReport:
    path: str
    opset: int
    inputs: list[dict] = field(default_factory=list)  # {"name", "shape"}
    outputs: list[str] = field(default_factory=list)
    op_counts: dict[str, int] = field(default_factory=dict)
    fold: FoldReport | None = None
    fp16: bool = False  # float16 weights and arithmetic, float32 inputs and outputs
    # Nodes given an equivalent form that onnxruntime's optimizer cannot break (`guards`).
    guards: list[str] = field(default_factory=list)

    @property
    def bn_folded(self) -> int:
        return self.fold.bn_folded if self.fold else 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fold"] = self.fold.to_dict() if self.fold else None
        d["bn_folded"] = self.bn_folded
        return d


def _dim_names(proto, batch_size: int | None) -> None:
    """Name symbolic dims: the first 'batch', any other '<tensor>_dim<i>'."""
    for value in list(proto.graph.input) + list(proto.graph.output):
        for i, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_value") and not (i == 0 and batch_size is None):
                continue
            if i == 0:
                if batch_size is None:
                    dim.ClearField("dim_value")
                    dim.dim_param = BATCH_DIM
            else:
                dim.dim_param = f"{value.name}_dim{i}"


def _order_outputs(proto, names: list[str]) -> None:
    by_name = {o.name: o for o in proto.graph.output}
    if sorted(by_name) != sorted(names):
        raise ExportError(f"ONNX outputs {sorted(by_name)} do not match Keras outputs {names}")
    ordered = [by_name[n] for n in names]
    copies = [type(o)() for o in ordered]
    for c, o in zip(copies, ordered):
        c.CopyFrom(o)
    del proto.graph.output[:]
    proto.graph.output.extend(copies)


def _freeze_captured_constants(proto, function, input_names: set) -> None:
    """Turn graph inputs that are really captured constants into initializers.

    A layer may hold its state as a plain tensor rather than a variable (keras's
    Normalization does after a .keras load: mean and variance become EagerTensors).
    tf2onnx freezes variables but leaves such captures as extra graph inputs, which no
    user can feed. Their values are the concrete function's captured inputs."""
    import numpy as np
    import onnx

    extra = [i for i in proto.graph.input if i.name not in input_names]
    if not extra:
        return
    concrete = function.get_concrete_function()
    values = {}
    for placeholder, value in zip(concrete.graph.internal_captures, concrete.captured_inputs):
        if getattr(value, "dtype", None) is not None and value.dtype.name != "resource":
            values[placeholder.name] = np.asarray(value)
    for graph_input in extra:
        if graph_input.name in values:
            proto.graph.initializer.append(onnx.numpy_helper.from_array(values[graph_input.name], graph_input.name))
            proto.graph.input.remove(graph_input)
    left = [i.name for i in proto.graph.input if i.name not in input_names]
    if left:
        raise ExportError(f"the ONNX graph has inputs that are not model inputs: {left}")


def _reject_unconverted(proto, model: keras.Model) -> None:
    """Raise ExportError naming the Keras layers whose TensorFlow ops tf2onnx left in the
    graph unconverted (onnx.checker would only say "No Op registered for ...")."""
    import onnx

    unconverted = [n for n in proto.graph.node
                   if n.domain in ("", "ai.onnx") and not onnx.defs.has(n.op_type, n.domain)]
    if not unconverted:
        return
    by_name = {layer.name: layer for layer in internals.all_sublayers(model)}
    culprits = []
    for node in unconverted:
        # TensorFlow name scopes are the layer names, uniquified with a "_1" suffix.
        parts = [p for part in node.name.split("/") for p in (part, re.sub(r"_\d+$", "", part))]
        layer = next((by_name[p] for p in reversed(parts) if p in by_name), None)
        where = f"layer '{layer.name}' ({type(layer).__name__})" if layer else f"node '{node.name}'"
        culprit = f"{where}: {node.op_type}"
        if culprit not in culprits:
            culprits.append(culprit)
    more = f" and {len(culprits) - 3} more" if len(culprits) > 3 else ""
    raise ExportError(
        "tf2onnx left TensorFlow operations unconverted in " + "; ".join(culprits[:3]) + more
    )


def to_onnx_proto(model: keras.Model, *, opset: int = DEFAULT_OPSET, batch_size: int | None = None):
    """Convert a Keras model (TensorFlow backend) to an onnx.ModelProto, named as Keras names it."""
    require_tensorflow_backend("ONNX export (tf2onnx)")
    if opset not in SUPPORTED_OPSETS:
        raise ExportError(
            f"opset must be {SUPPORTED_OPSETS.start}-{SUPPORTED_OPSETS.stop - 1} (tf2onnx's range); "
            f"got {opset}"
        )
    import tensorflow as tf
    import tf2onnx

    specs = [
        tf.TensorSpec((batch_size,) + tuple(shape[1:]), tf.as_dtype(dtype), name=name)
        for name, shape, dtype in input_specs(model)
    ]
    names = output_names(model)

    def forward(*args):
        out = model(list(args) if len(args) > 1 else args[0], training=False)
        return dict(zip(names, keras.tree.flatten(out)))

    function = tf.function(forward, input_signature=specs, autograph=False)
    try:
        with internals.traceable_convolutions():
            proto, _ = tf2onnx.convert.from_function(function, input_signature=specs, opset=opset)
    except Exception as exc:  # tf2onnx raises whatever its handlers raise
        raise ExportError(f"tf2onnx could not convert the model: {type(exc).__name__}: {exc}") from exc
    _freeze_captured_constants(proto, function, {spec.name for spec in specs})
    _reject_unconverted(proto, model)
    _order_outputs(proto, names)
    _dim_names(proto, batch_size)
    return proto


def export_onnx(
    model: keras.Model,
    path: str | Path,
    *,
    fold: bool = True,
    exclude: Sequence[str] = (),
    opset: int = DEFAULT_OPSET,
    batch_size: int | None = None,
    fp16: bool = False,
    atomic: bool = True,
) -> ExportReport:
    """Export `model` to ONNX at `path` (written atomically), folding BN first.

    Args:
        model: A Keras model (TensorFlow backend). Never changed.
        path: Output .onnx file.
        fold: Fold BatchNormalization layers first (`fold_batchnorms`).
        exclude: Names of BN layers the fold keeps.
        opset: ONNX opset, 13-18.
        batch_size: Fix the batch dimension; None keeps it symbolic, named 'batch'.
        fp16: Convert weights and arithmetic to float16 (onnxconverter-common),
            keeping float32 inputs and outputs. Verify it with float16 tolerances.
        atomic: Write through a temporary file and a rename; False writes `path` directly
            (for a caller that already holds a temporary path: `stage.verify_and_commit`).

    Returns:
        An ExportReport: names and shapes of the inputs, output names, ONNX op
        counts and the fold report.

    Raises:
        ExportError: tf2onnx failed, or the result does not pass onnx.checker.

    A zero Pad feeding a MaxPool is written in a form onnxruntime's `Pad_Fusion` rewrite
    leaves alone (see `guards`); the report lists each.
    """
    import onnx

    fold_report = None
    if fold:
        model, fold_report = fold_batchnorms(model, exclude=exclude)
    proto = to_onnx_proto(model, opset=opset, batch_size=batch_size)
    if fp16:
        proto = _to_float16(proto)
    guards = guard_pad_into_maxpool(proto)
    try:
        # The structural check; shape errors would show in verify_onnx's onnxruntime run
        # anyway, and full_check's shape inference costs ~0.4 s on ResNet50.
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise ExportError(f"onnx.checker rejected the converted model: {exc}") from exc
    if not atomic:
        onnx.save_model(proto, str(path))
    else:
        with atomic_output(path) as tmp:
            onnx.save_model(proto, str(tmp))
    inputs = [
        {"name": i.name, "shape": [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]}
        for i in proto.graph.input
    ]
    return ExportReport(
        path=str(path),
        opset=opset,
        inputs=inputs,
        outputs=[o.name for o in proto.graph.output],
        op_counts=dict(sorted(collections.Counter(n.op_type for n in proto.graph.node).items())),
        fold=fold_report,
        fp16=fp16,
        guards=guards,
    )


def _to_float16(proto):
    import warnings

    from onnxconverter_common import float16

    with warnings.catch_warnings():
        # It warns for every weight below float16's range that it rounds (to +-1e-7).
        warnings.simplefilter("ignore", UserWarning)
        return float16.convert_float_to_float16(proto, keep_io_types=True)
