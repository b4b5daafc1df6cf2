"""`export_litert`: a Keras model to a LiteRT (.tflite) file, folded first.

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import keras

from keras_bn_ext.compare import input_specs, output_names
from keras_bn_ext.errors import ExportError, require_tensorflow_backend
from keras_bn_ext.folding.fold import FoldReport, fold_batchnorms
from keras_bn_ext.export.serving import serving_function
from keras_bn_ext.model_io import atomic_output

__all__ = ["LiteRTExportReport", "convert_litert", "export_litert", "SIGNATURE"]

SIGNATURE = "serving_default"


@dataclass
class LiteRTExportReport:
    path: str
    inputs: list[dict] = field(default_factory=list)  # {"name", "shape"} (None: dynamic)
    outputs: list[str] = field(default_factory=list)
    op_counts: dict[str, int] = field(default_factory=dict)  # read by the runner (verify)
    fold: FoldReport | None = None
    precision: str = "float32"  # float32 | float16 weights | int8
    batch_size: int | None = None  # None: dynamic; 1 where the converter needs static shapes
    batch_note: str | None = None  # why the batch is fixed

    @property
    def bn_folded(self) -> int:
        return self.fold.bn_folded if self.fold else 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fold"] = self.fold.to_dict() if self.fold else None
        d["bn_folded"] = self.bn_folded
        return d


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
                    batch_size: int | None = None) -> bytes:
    """Convert `model` (TensorFlow backend) to LiteRT flatbuffer bytes. `representative`: a
    callable yielding lists of input arrays, for full-integer INT8. `batch_size`: fix the
    batch (None: dynamic)."""
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


def export_litert(
    model: keras.Model,
    path: str | Path,
    *,
    fold: bool = True,
    exclude: Sequence[str] = (),
    fp16: bool = False,
    atomic: bool = True,
) -> LiteRTExportReport:
    """Export `model` to LiteRT at `path` (written atomically), folding BN first.

    Args:
        model: A Keras model (TensorFlow backend). Never changed.
        path: Output .tflite file.
        fold: Fold BatchNormalization layers first (`fold_batchnorms`).
        exclude: Names of BN layers the fold keeps.
        fp16: float16 weights (the converter's float16 quantization; inputs, outputs and
            arithmetic on the CPU stay float32). Verify it with float16 tolerances.
        atomic: Write through a temporary file and a rename; False writes `path` directly
            (for a caller that already holds a temporary path: `stage.verify_and_commit`).

    Raises:
        ExportError: the converter failed. BackendError: Keras runs on another backend.
    """
    fold_report = None
    if fold:
        model, fold_report = fold_batchnorms(model, exclude=exclude)
    data, batch_size = convert_litert(model, fp16=fp16)
    if not atomic:
        Path(path).write_bytes(data)
    else:
        with atomic_output(path) as tmp:
            Path(tmp).write_bytes(data)
    return LiteRTExportReport(
        path=str(path),
        inputs=[{"name": n, "shape": [batch_size] + [None if d is None else int(d) for d in s[1:]]}
                for n, s, _ in input_specs(model)],
        outputs=output_names(model),
        fold=fold_report,
        precision="float16 weights" if fp16 else "float32",
        batch_size=batch_size,
        batch_note=STATIC_BATCH_NOTE if batch_size else None,
    )
