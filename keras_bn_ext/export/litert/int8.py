"""The LiteRT target's INT8 quantizer, for the shared driver (`export.int8.export_int8`):
full-integer INT8 (`TFLITE_BUILTINS_INT8`, float32 inputs and outputs) from TensorFlow's
converter with the calibration samples as its representative dataset, run on ai-edge-litert.
The converter has no per-node exclusion, so the driver's node fallback does not apply."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from keras_bn_ext.export.litert.convert import to_tflite_bytes
from keras_bn_ext.progress import phase, steps

__all__ = ["LiteRTInt8Detail", "LiteRTQuantizer"]


@dataclass
class LiteRTInt8Detail:
    per_channel: bool = True  # one weight scale per output channel (the converter's default)
    format = "full-integer INT8 (float32 inputs and outputs)"

    def to_dict(self) -> dict:
        return {"format": self.format, "per_channel": self.per_channel}


class LiteRTQuantizer:
    method = "TFLiteConverter representative dataset"
    equalize_by_default = False
    can_rank = False

    def __init__(self, data, options, work: Path):
        from keras_bn_ext.export.litert.target import LITERT

        self.runner = LITERT
        self.data, self.options, self.work = data, options, work

    def float_file(self, candidate, tag: str) -> Path:
        path = self.work / f"{tag}.float.tflite"
        if not path.exists():
            with phase("convert float (LiteRT converter)"):
                path.write_bytes(to_tflite_bytes(candidate))
        return path

    def quantize(self, candidate, tag: str, excluded: list[str]) -> Path:
        size = self.options.calibration_batch_size
        batches = -(-len(self.data.calibration[0]) // size)
        with steps("convert and calibrate (LiteRT converter)", batches) as advance:
            def representative():
                for batch in self.data.batches(size):
                    yield [np.asarray(a) for a in batch]
                    advance()

            path = self.work / f"{tag}.int8.tflite"
            path.write_bytes(to_tflite_bytes(candidate, representative=representative))
        return path

    def rank(self, float_file, int8_file, tag):
        return []

    def copy(self, source: Path, destination: Path) -> None:
        shutil.copyfile(source, destination)

    def size(self, path: Path) -> int:
        return os.path.getsize(path)

    def op_counts(self, path: Path) -> dict:
        return {}  # the driver takes the interpreter's reading of the written file

    def detail(self, tag: str) -> LiteRTInt8Detail:
        return LiteRTInt8Detail()
