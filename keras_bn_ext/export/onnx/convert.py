"""`export_onnx`: a Keras model to an ONNX file through tf2onnx, folded first."""

from __future__ import annotations

import collections
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import keras
import numpy as np

from keras_bn_ext import _keras_internals as internals
from keras_bn_ext.compare import input_specs, output_names
from keras_bn_ext.errors import ExportError, require_tensorflow_backend
from keras_bn_ext.export.onnx.guards import guard_pad_into_maxpool
from keras_bn_ext.export.onnx.options import (
    BATCH_DIM,
    CONVERSIONS,
    DEFAULT_OPSET,
    EXTERNAL_DATA_THRESHOLD,
    SUPPORTED_OPSETS,
    OnnxOptions,
)
from keras_bn_ext.export.options import ExportOptions
from keras_bn_ext.folding.fold import FoldReport, fold_batchnorms
from keras_bn_ext.progress import phase
from keras_bn_ext.stage import atomic_bundle

__all__ = ["export_onnx", "file_op_counts", "op_counts", "to_onnx_proto", "ExportReport"]


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
    conversion: str = "structure"  # options.CONVERSIONS: how tf2onnx met the weights
    conversion_fallback: str | None = None  # why "structure" gave way to "frozen"
    external_data: str | None = None  # the weights' file beside the model, when external
    external_data_bytes: int = 0

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

    from keras_bn_ext.export.onnx import handlers

    unconverted = [n for n in proto.graph.node
                   if n.domain in ("", "ai.onnx") and not onnx.defs.has(n.op_type, n.domain)]
    if not unconverted:
        return
    by_name = {layer.name: layer for layer in internals.all_sublayers(model)}
    culprits, first = [], None
    for node in unconverted:
        # TensorFlow name scopes are the layer names, uniquified with a "_1" suffix.
        parts = [p for part in node.name.split("/") for p in (part, re.sub(r"_\d+$", "", part))]
        layer = next((by_name[p] for p in reversed(parts) if p in by_name), None)
        where = f"layer '{layer.name}' ({type(layer).__name__})" if layer else f"node '{node.name}'"
        culprit = f"{where}: {node.op_type}"
        if node.op_type in handlers.REFUSED:
            culprit += f" ({handlers.REFUSED[node.op_type]})"
        first = first or (layer.name if layer else None, node.op_type)
        if culprit not in culprits:
            culprits.append(culprit)
    more = f" and {len(culprits) - 3} more" if len(culprits) > 3 else ""
    error = ExportError("tf2onnx left TensorFlow operations unconverted in " + "; ".join(culprits[:3]) + more)
    error.layer, error.op = first
    raise error


def to_onnx_proto(model: keras.Model, *, opset: int = DEFAULT_OPSET, batch_size: int | None = None,
                  conversion: str = "structure", to_tensor: Callable[[str, np.ndarray], object] | None = None):
    """Convert a Keras model (TensorFlow backend) to an onnx.ModelProto, named as Keras names it.

    Args:
        conversion: "structure" (default): tf2onnx converts the model traced with its
            kernels as inputs, and their values are attached afterwards
            (`export.onnx.structure`): the graph tf2onnx gives, at a small multiple of the
            weights' memory. "frozen": tf2onnx freezes every variable into the graph (its
            own route: ~260 bytes of memory per parameter).
        to_tensor: With "structure", makes each attached initializer from `(name, array)`
            (an external-data writer; default: the bytes inside the graph).
    """
    return _convert(model, opset=opset, batch_size=batch_size, conversion=conversion, to_tensor=to_tensor)[0]


def _convert(model, *, opset, batch_size, conversion, to_tensor=None) -> tuple[object, str, str | None]:
    """(proto, the conversion used, why "structure" fell back to "frozen" or None)."""
    require_tensorflow_backend("ONNX export (tf2onnx)")
    if opset not in SUPPORTED_OPSETS:
        raise ExportError(
            f"opset must be {SUPPORTED_OPSETS.start}-{SUPPORTED_OPSETS.stop - 1} (tf2onnx's range); "
            f"got {opset}"
        )
    if conversion not in CONVERSIONS:
        raise ValueError(f"conversion must be one of {CONVERSIONS}. Received: conversion={conversion!r}")
    fallback = None
    if conversion == "structure":
        from keras_bn_ext.export.onnx.structure import attach_weights, to_onnx_structure

        try:
            structure = to_onnx_structure(model, opset=opset, batch_size=batch_size)
        except Exception as exc:  # noqa: BLE001 - any failure of the lean route: tf2onnx's own route decides
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            fallback = f"the structure conversion failed ({type(exc).__name__}: {first}); weights frozen instead"
        else:
            loops = sorted({n.op_type for n in structure.proto.graph.node if n.op_type in _CONTROL_FLOW})
            if loops:
                # Weights read inside a loop body come from the outer scope, where tf2onnx's loop
                # conversion types them differently when they are inputs (a GRU's Loop then
                # fails onnxruntime's type inference): recurrent models keep tf2onnx's route.
                fallback = (f"the graph has control flow ({', '.join(loops)}): weights frozen, as tf2onnx "
                            "converts loops")
            else:
                attach_weights(structure, to_tensor)
                proto, function, input_names = structure.proto, structure.function, set(structure.input_names)
            del structure
    if conversion == "frozen" or fallback is not None:
        if to_tensor is not None:
            raise ExportError("weights can be streamed to external data only by the structure conversion"
                              + (f": {fallback}" if fallback else ""))
        proto, function, input_names = _convert_frozen(model, opset=opset, batch_size=batch_size)
    _freeze_captured_constants(proto, function, input_names)
    _reject_unconverted(proto, model)
    _order_outputs(proto, output_names(model))
    _dim_names(proto, batch_size)
    return proto, "frozen" if fallback else conversion, fallback


_CONTROL_FLOW = {"Loop", "If", "Scan"}


def _convert_frozen(model, *, opset, batch_size):
    import tensorflow as tf
    import tf2onnx

    from keras_bn_ext.export.onnx import handlers

    handlers.register()  # this project's tf2onnx handlers (Erfc, Expm1, Where kept, ...)

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
    return proto, function, {spec.name for spec in specs}


def op_counts(proto) -> dict:
    """{op type: nodes} of an ONNX model's main graph, sorted by op type."""
    return dict(sorted(collections.Counter(n.op_type for n in proto.graph.node).items()))


def file_op_counts(path) -> dict:
    """`op_counts` of the ONNX file at `path` (its external data is not read)."""
    import onnx

    return op_counts(onnx.load(str(path), load_external_data=False))


def export_onnx(
    model: keras.Model,
    path: str | Path,
    *,
    options: ExportOptions | None = None,
    onnx: OnnxOptions | None = None,
    atomic: bool = True,
) -> ExportReport:
    """Export `model` to ONNX at `path` (written atomically), folding BN first.

    Args:
        model: A Keras model (TensorFlow backend). Never changed.
        path: Output .onnx file.
        options: What every target's export reads (`ExportOptions`): `fold` (fold
            BatchNormalization first, `fold_batchnorms`), `exclude` (BN layers the fold
            keeps), `batch_size` (fix the batch dimension; None keeps it symbolic, named
            'batch'), `fp16` (float16 weights and arithmetic via onnxconverter-common,
            float32 inputs and outputs; verify with float16 tolerances). Its
            verification fields are unused here.
        onnx: The ONNX target's options (`OnnxOptions`): `opset` (13-18),
            `conversion` ("structure" or "frozen", see `to_onnx_proto`),
            `external_data` (weights in `<path>.data` beside the model, streamed as
            they are attached; None: when they exceed `options.EXTERNAL_DATA_THRESHOLD`,
            a protobuf cannot exceed 2 GiB).
        atomic: Write through temporary files and renames (model and data file
            together); False writes `path` (and its data file) directly, for a caller
            that already holds a temporary place: `stage.verify_and_commit`.

    Returns:
        An ExportReport: names and shapes of the inputs, output names, ONNX op
        counts, the conversion used and the fold report.

    Raises:
        ExportError: tf2onnx failed, or the result does not pass onnx.checker.

    A zero Pad feeding a MaxPool is written in a form onnxruntime's `Pad_Fusion` rewrite
    leaves alone (see `guards`); the report lists each.
    """
    options = options if options is not None else ExportOptions()
    onnx_options = onnx if onnx is not None else OnnxOptions()
    fold, exclude, batch_size, fp16 = options.fold, options.exclude, options.batch_size, options.fp16
    opset, external_data, conversion = onnx_options.opset, onnx_options.external_data, onnx_options.conversion
    fold_report = None
    if fold:
        with phase("fold"):
            model, fold_report = fold_batchnorms(model, exclude=exclude)
    weight_bytes = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in model.weights)
    external = external_data if external_data is not None else weight_bytes > EXTERNAL_DATA_THRESHOLD
    if external and fp16:
        raise ExportError("float16 conversion of a model with external data is not supported; "
                          "export float32 (or without --external-data)")

    def write(target: Path) -> tuple:
        import onnx

        sink = _ExternalData(target) if external else None
        try:
            with phase("convert (tf2onnx)"):
                proto, used, fallback = _convert(model, opset=opset, batch_size=batch_size, conversion=conversion,
                                                 to_tensor=sink)
        finally:
            if sink is not None:
                sink.close()
        if fp16:
            proto = _to_float16(proto)
        guards = guard_pad_into_maxpool(proto)
        with phase("write"):
            onnx.save_model(proto, str(target))
        try:
            # The structural check (from the file: external data is checked where it lies);
            # shape errors would show in verify_onnx's onnxruntime run anyway, and
            # full_check's shape inference costs ~0.4 s on ResNet50.
            onnx.checker.check_model(str(target))
        except Exception as exc:
            raise ExportError(f"onnx.checker rejected the converted model: {exc}") from exc
        return proto, used, fallback, guards, sink

    if not atomic:
        proto, used, fallback, guards, sink = write(Path(path))
    else:  # the model and, with external data, its data file: both or neither
        with atomic_bundle(path) as tmp:
            proto, used, fallback, guards, sink = write(tmp)
    inputs = [
        {"name": i.name, "shape": [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]}
        for i in proto.graph.input
    ]
    return ExportReport(
        path=str(path),
        opset=opset,
        inputs=inputs,
        outputs=[o.name for o in proto.graph.output],
        op_counts=op_counts(proto),
        fold=fold_report,
        fp16=fp16,
        guards=guards,
        conversion=used,
        conversion_fallback=fallback,
        external_data=str(Path(path).with_name(sink.location)) if sink else None,
        external_data_bytes=sink.offset if sink else 0,
    )


class _ExternalData:
    """A tensor maker for `structure.attach_weights`: each initializer's bytes are appended to
    `<model>.data` (page-aligned, as onnx's own external-data writer aligns them) and the
    graph gets a tensor that points there (onnx's external-data fields: location,
    offset, length). Nothing but one weight is held at a time."""

    ALIGN = 4096

    def __init__(self, model_path: Path):
        self.location = model_path.name + ".data"
        self.file = open(model_path.with_name(self.location), "wb")
        self.offset = 0

    def __call__(self, name: str, array: np.ndarray):
        import onnx
        from onnx import helper

        array = np.ascontiguousarray(array)
        if array.dtype.byteorder == ">":  # ONNX stores little-endian
            array = array.astype(array.dtype.newbyteorder("<"))
        pad = -self.offset % self.ALIGN
        if pad:
            self.file.write(b"\0" * pad)
            self.offset += pad
        length = self.file.write(memoryview(array).cast("B"))
        tensor = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                                  dims=list(array.shape), data_location=onnx.TensorProto.EXTERNAL)
        for key, value in (("location", self.location), ("offset", str(self.offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.offset += length
        return tensor

    def close(self) -> None:
        self.file.close()


def _to_float16(proto):
    import warnings

    from onnxconverter_common import float16

    with warnings.catch_warnings():
        # It warns for every weight below float16's range that it rounds (to +-1e-7).
        warnings.simplefilter("ignore", UserWarning)
        return float16.convert_float_to_float16(proto, keep_io_types=True)
