"""Keras model -> OpenVINO IR: `openvino.convert_model` on the folded model's ONNX graph, the
inputs and outputs named as Keras names them, the batch dimension dynamic, `openvino.save_model`
writing float32 weights (its default compresses them to float16: only with fp16)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import keras

from keras_bn_ext.compare import input_specs, output_names
from keras_bn_ext.errors import ExportError, require_tensorflow_backend
from keras_bn_ext.export.options import ExportOptions
from keras_bn_ext.export.target import Conversion
from keras_bn_ext.folding.fold import fold_batchnorms

__all__ = ["convert_openvino", "to_openvino_model"]


def to_openvino_model(model: keras.Model):
    """The `openvino.Model` of a Keras model (TensorFlow backend), named as Keras names its
    inputs and outputs, through the ONNX target's converter (tf2onnx; names and dynamic batch
    as Keras's) and OpenVINO's ONNX frontend. OpenVINO's own TensorFlow frontend was tried
    first and is not used: on a folded depthwise-separable net it produced outputs 0.97 off
    (relative) while the ONNX route agrees to 1e-7. Raises ExportError when OpenVINO cannot
    convert it."""
    require_tensorflow_backend("OpenVINO export")
    import openvino as ov

    from keras_bn_ext.export.onnx.convert import export_onnx

    with tempfile.TemporaryDirectory(prefix="keras_bn_ext_openvino_") as work:
        onnx_path = Path(work) / "model.onnx"
        export_onnx(model, onnx_path, options=ExportOptions(fold=False), atomic=False)
        try:
            converted = ov.convert_model(str(onnx_path))
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises its own OpConversionFailure and others
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise ExportError(f"openvino.convert_model failed: {type(exc).__name__}: {first}") from exc
    specs, names = input_specs(model), output_names(model)
    if sorted(p.get_any_name() for p in converted.inputs) != sorted(n for n, _, _ in specs) or \
            sorted(p.get_any_name() for p in converted.outputs) != sorted(names):
        raise ExportError(f"OpenVINO's model names {[p.get_any_name() for p in converted.inputs]} -> "
                          f"{[p.get_any_name() for p in converted.outputs]}, not Keras's")
    return converted


def convert_openvino(model: keras.Model, path, options) -> Conversion:
    """Fold (per `options`), convert, save the IR at `path` (`.xml`, with its `.bin` beside)."""
    import openvino as ov

    fold_report = None
    if options.fold:
        model, fold_report = fold_batchnorms(model, exclude=options.exclude)
    converted = to_openvino_model(model)
    ov.save_model(converted, str(path), compress_to_fp16=options.fp16)
    ops: dict[str, int] = {}
    for node in converted.get_ordered_ops():
        kind = node.get_type_name()
        if kind not in ("Parameter", "Result", "Constant"):
            ops[kind] = ops.get(kind, 0) + 1
    return Conversion(
        path=str(path),
        inputs=[{"name": n, "shape": [None if d is None else int(d) for d in s]} for n, s, _ in input_specs(model)],
        output_names=output_names(model), fold=fold_report,
        precision="float16 weights" if options.fp16 else "float32",
        op_counts=dict(sorted(ops.items())), companions=[str(Path(path).with_suffix(".bin"))])
