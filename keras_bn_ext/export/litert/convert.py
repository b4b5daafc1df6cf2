"""`convert_litert_file`: a Keras model to a LiteRT (.tflite) file, folded first.

The model is written out as a SavedModel through Keras's own `ExportArchive` (it tracks
every Keras variable, so the converter freezes them), with one `serving_default`
signature whose inputs are named as the Keras inputs and whose outputs are a dict keyed
by the Keras output names; the batch dimension stays dynamic (resizable on the
interpreter). Then `tf.lite.TFLiteConverter.from_saved_model` converts it.

Recurrent layers (GRU, LSTM) run a while loop over a TensorList whose element shape
holds the batch: the converter lowers it to builtin ops only when that shape is static
("requires element_shape to be static"). For those models the batch is fixed to 1 and
the report says so (`batch_size`); the alternative the converter suggests (Select TF ops)
needs TensorFlow's Flex delegate, which ai-edge-litert does not ship.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import keras

from keras_bn_ext.compare import input_specs, output_names
from keras_bn_ext.errors import ExportError, require_tensorflow_backend
from keras_bn_ext.folding.fold import fold_batchnorms
from keras_bn_ext.export.serving import serving_function
from keras_bn_ext.export.target import Conversion

__all__ = ["STATIC_BATCH_NOTE", "SIGNATURE", "convert_litert", "convert_litert_file", "to_tflite_bytes"]

SIGNATURE = "serving_default"


STATIC_SHAPES_NEEDED = "requires element_shape to be static"  # the converter's words for a TensorList
STATIC_BATCH_NOTE = ("batch fixed to 1: the LiteRT converter lowers the recurrent layers' tensor lists to builtin "
                     "ops only with static shapes")


def convert_litert(model: keras.Model, *, fp16: bool = False, representative=None) -> tuple[bytes, int | None]:
    """`to_tflite_bytes` with a dynamic batch, or with the batch fixed to 1 where the
    converter needs static shapes (recurrent layers). Returns (bytes, batch_size or None)."""
    try:
        return to_tflite_bytes(model, fp16=fp16, representative=representative), None
    except ExportError as exc:
        if STATIC_SHAPES_NEEDED not in str(exc.__cause__ or exc):
            raise
    return to_tflite_bytes(model, fp16=fp16, representative=representative, batch_size=1), 1


def to_tflite_bytes(model: keras.Model, *, fp16: bool = False, representative=None,
                    batch_size: int | None = None, learned: bool = False) -> bytes:
    """Convert `model` (TensorFlow backend) to LiteRT flatbuffer bytes. `representative`: a
    callable yielding lists of input arrays, for full-integer INT8. `batch_size`: fix the
    batch (None: dynamic). `learned`: the model carries FakeQuant markers
    (`export.qat.export_model`), whose ranges the converter quantizes with (its own weight
    scales are per channel; per-tensor kernels carry a marker of their own)."""
    require_tensorflow_backend("LiteRT export")
    import tensorflow as tf

    serve, signature = serving_function(model, batch_size)
    with tempfile.TemporaryDirectory(prefix="keras_bn_ext_litert_") as tmp:
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint(SIGNATURE, serve, input_signature=signature)
        try:
            archive.write_out(tmp, verbose=False)
            converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=[SIGNATURE])
            if fp16:
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
                converter.target_spec.supported_types = [tf.float16]
            if representative is not None:
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
                converter.representative_dataset = representative
                converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
                # Inputs and outputs stay float32 (quantized inside), as the ONNX INT8 file.
            if learned:
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
            return converter.convert()
        except Exception as exc:  # noqa: BLE001 - the converter's many error types
            # "TF Select ops: Erf, Tan": TensorFlow ops with no LiteRT builtin kernel (they would
            # need the Flex delegate, which ai-edge-litert's interpreter does not carry).
            select = re.search(r"TF Select ops: ([^\n]+)", str(exc))
            ops = [o.strip() for o in select.group(1).split(",") if o.strip()] if select else sorted(
                set(re.findall(r"'tf\.(\w+)' op is neither a custom op nor a flex op", str(exc))))
            if ops:
                error = ExportError(f"LiteRT has no builtin kernel for the TensorFlow op(s) {', '.join(ops)} "
                                    "(they would need TensorFlow's Flex delegate)")
                error.op = ops[0]
                raise error from exc
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise ExportError(f"the LiteRT converter failed: {type(exc).__name__}: {first}") from exc


def convert_litert_file(model: keras.Model, path, options) -> Conversion:
    """The LiteRT target's `convert`: fold (per `options`), convert (dynamic batch, or fixed to
    1 where recurrent layers need it), write the flatbuffer to `path`."""
    fold_report = None
    if options.fold:
        model, fold_report = fold_batchnorms(model, exclude=options.exclude)
    data, batch_size = convert_litert(model, fp16=options.fp16)
    Path(path).write_bytes(data)
    return Conversion(
        path=str(path),
        inputs=[{"name": n, "shape": [batch_size] + [None if d is None else int(d) for d in s[1:]]}
                for n, s, _ in input_specs(model)],
        output_names=output_names(model), fold=fold_report,
        precision="float16 weights" if options.fp16 else "float32", batch_size=batch_size)
