"""onnxruntime's pre-quantization step and static quantization of an ONNX file (QDQ, u8
activations, s8 weights), and the ranking of quantized nodes by the error they add, each run
in a child process (`_quantize_worker`: onnxruntime and TensorFlow never share a process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from keras_bn_ext.errors import ExportError
from keras_bn_ext.export.onnx import _quantize_worker

__all__ = ["preprocess_onnx", "quantize_onnx", "rank_nodes"]


def _run(request: dict, on_batch: Callable[[], None] | None = None) -> dict:
    """Run the worker on `request`; `on_batch` is called for each calibration batch it
    reports through an inherited pipe (the progress bar)."""
    with tempfile.TemporaryDirectory(prefix="keras_bn_ext_quant_") as tmp:
        req, res = os.path.join(tmp, "request.json"), os.path.join(tmp, "response.json")
        read_fd, write_fd = os.pipe()
        try:
            with open(req, "w", encoding="utf-8") as f:
                json.dump({**request, "progress_fd": write_fd}, f)
            with open(os.path.join(tmp, "log"), "w+", encoding="utf-8") as log:
                proc = subprocess.Popen([sys.executable, _quantize_worker.__file__, req, res], stdout=log,
                                        stderr=log, pass_fds=(write_fd,), text=True)
                os.close(write_fd)
                write_fd = None
                try:
                    with os.fdopen(read_fd, "rb") as lines:
                        read_fd = None
                        for _ in lines:  # ends when the worker exits (its end of the pipe closes)
                            if on_batch is not None:
                                on_batch()
                    returncode = proc.wait()
                finally:
                    if proc.poll() is None:  # interrupted (Ctrl-C, SIGTERM): the worker goes too
                        proc.kill()
                        proc.wait()
                log.seek(0)
                stderr = log.read()
        finally:
            for fd in (read_fd, write_fd):
                if fd is not None:
                    os.close(fd)
        if returncode != 0:
            last = (stderr.strip().splitlines() or ["no output"])[-1]
            raise ExportError(f"onnxruntime quantization ({request['action']}) failed on {request['model']}: "
                              f"{last[:400]}")
        with open(res, encoding="utf-8") as f:
            return json.load(f)


def preprocess_onnx(float_path: str | os.PathLike, out_path: str | os.PathLike) -> None:
    """onnxruntime's `quant_pre_process` of `float_path` into `out_path` (graph
    optimizations that make a better INT8 graph: a zero Pad moved into its Conv)."""
    _run({"action": "preprocess", "model": str(Path(float_path).resolve()),
          "output": str(Path(out_path).resolve())})


@dataclass(frozen=True)
class QuantizeSettings:
    """How `quantize_static` quantizes: weight scales per channel, 7-bit weights (`reduce_range`),
    the calibration method and the samples per calibration batch."""

    per_channel: bool
    reduce_range: bool
    method: str
    batch_size: int
    weight_bits: int = 8  # 4: int4 weights (the graph at opset 21); the per-channel axes of `export.onnx.clip`


def quantize_onnx(
    float_path: str | os.PathLike,
    out_path: str | os.PathLike,
    calibration_npz: str | os.PathLike,
    input_names: Sequence[str],
    *,
    settings: QuantizeSettings,
    nodes_to_exclude: Sequence[str] = (),
    cache: str | os.PathLike | None = None,
    on_batch: Callable[[], None] | None = None,
) -> dict:
    """`onnxruntime.quantization.quantize_static` of `float_path` into `out_path`, calibrated
    on the arrays of `calibration_npz` (keyed by input name), streamed `settings.batch_size`
    at a time. `cache`: a calibration-range cache file (written on the first run, read
    after). `on_batch`: called as each calibration batch is handed to onnxruntime."""
    return _run({
        "action": "quantize", "model": str(Path(float_path).resolve()), "output": str(Path(out_path).resolve()),
        "calibration": str(calibration_npz), "input_names": list(input_names), "batch_size": int(settings.batch_size),
        "per_channel": bool(settings.per_channel), "reduce_range": bool(settings.reduce_range),
        "method": settings.method, "nodes_to_exclude": list(nodes_to_exclude), "cache": str(cache) if cache else None,
        "weight_bits": int(settings.weight_bits),
    }, on_batch)


def rank_nodes(float_path, quantized_path, samples_npz, input_names: Sequence[str], *, batch_size: int,
               workdir: str | os.PathLike) -> list[dict]:
    """The float model's nodes, the one whose quantized output loses the most SQNR against
    the float model beyond what its inputs already lost first (onnxruntime's
    qdq_loss_debug activations on `samples_npz`)."""
    return _run({
        "action": "rank", "model": str(Path(float_path).resolve()), "quantized": str(Path(quantized_path).resolve()),
        "samples": str(samples_npz), "input_names": list(input_names), "batch_size": int(batch_size),
        "workdir": str(workdir),
    })["ranking"]
