"""Quantize an ONNX model with onnxruntime.quantization, in a process of its own.

Started as a script (`python path/to/_quantize_worker.py REQUEST RESPONSE`), so it imports
neither this package nor TensorFlow (onnxruntime and TensorFlow never share a process:
see _ort_worker). REQUEST is a JSON file:

    {"action": "quantize", "model", "output", "calibration" (an .npz of the calibrated
     inputs, samples on axis 0), "input_names", "batch_size", "per_channel",
     "reduce_range", "method", "nodes_to_exclude", "cache" (calibration cache path),
     "progress_fd" (a pipe inherited from the parent: a line per calibration batch, or null)}
    {"action": "rank", "model" (float), "quantized", "samples" (.npz), "input_names",
     "batch_size", "workdir"}
    {"action": "preprocess", "model", "output"}

RESPONSE (JSON): quantize -> {"quantized_nodes": [...], "version"}; preprocess -> {"log"}; rank -> {"ranking":
[{"nodes", "op_types", "added_db", "sqnr_db"}]}: segments of the float graph between measured
(quantized) tensors, the one whose output loses the most SQNR against the float model beyond
what its inputs had lost first.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import math
import os
import sys


def _reader(path: str, names: list[str], batch_size: int, progress_fd: int | None = None):
    import numpy as np
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        """Streams the samples in batches; nothing but one batch is copied at a time."""

        def __init__(self):
            self._data = np.load(path, allow_pickle=False)
            self._n = len(self._data[names[0]]) if names else 0
            self._start = 0
            self._arrays = {name: self._data[name] for name in names}

        def get_next(self):
            if self._start >= self._n:
                return None
            # onnxruntime's histogram calibrators stack the batches' outputs, so every batch
            # has `batch_size` samples: the last one is the final `batch_size` samples,
            # overlapping the one before (a few samples counted twice, none left out).
            start = min(self._start, max(0, self._n - batch_size))
            batch = {name: self._arrays[name][start:start + batch_size] for name in names}
            self._start += batch_size
            if progress_fd is not None:  # one line per batch handed to onnxruntime: the parent's bar
                os.write(progress_fd, b"1\n")
            return batch

        def rewind(self):
            self._start = 0

    return Reader()


def quantize(req: dict) -> dict:
    import onnx
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    options = {
        "quant_format": QuantFormat.QDQ,
        "per_channel": bool(req["per_channel"]),
        "reduce_range": bool(req["reduce_range"]),
        "activation_type": QuantType.QUInt8,
        "weight_type": QuantType.QInt8,
        "calibrate_method": getattr(CalibrationMethod, req["method"]),
        "nodes_to_exclude": list(req.get("nodes_to_exclude") or []),
        "extra_options": {"ActivationSymmetric": False, "WeightSymmetric": True},
    }
    if int(req.get("weight_bits", 8)) == 4:  # int4 weights, per-channel on the axes the clipping used
        options.update(weight_type=QuantType.QInt4, reduce_range=False)
        options["extra_options"]["QDQOpTypePerChannelSupportToAxis"] = {"Conv": 0, "MatMul": 1}
    reader = _reader(req["calibration"], req["input_names"], int(req["batch_size"]), req.get("progress_fd"))
    if req.get("cache") and "calibration_cache_path" in inspect.signature(quantize_static).parameters:
        # The float tensors' ranges do not depend on which nodes are kept in float: the
        # fallback's later runs reuse them instead of calibrating again.
        options["calibration_cache_path"] = req["cache"]
    # onnxruntime prints its histogram progress to stdout; keep it for the log.
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        quantize_static(req["model"], req["output"], reader, **options)
    model = onnx.load(req["output"], load_external_data=False)
    quantized = sorted({n.input[0].rsplit("_QuantizeLinear_Output", 1)[0]
                        for n in model.graph.node if n.op_type == "DequantizeLinear"})
    return {"version": onnxruntime.__version__, "dequantized_tensors": len(quantized),
            "log": printed.getvalue()[-2000:]}


def preprocess(req: dict) -> dict:
    """onnxruntime's own pre-quantization pass (`quant_pre_process`): its basic graph
    optimizations (a zero Pad moved into the next Conv's pads, constants folded) and onnx
    shape inference. A Pad left between two quantized ops runs in float between a
    DequantizeLinear and a QuantizeLinear: on MobileNetV2 four of them cost more time than
    INT8 saved. Symbolic shape inference is skipped (it needs sympy; onnx's own inference
    serves these graphs)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        quant_pre_process(req["model"], req["output"], skip_symbolic_shape=True)
    return {"log": printed.getvalue()[-2000:]}


def rank(req: dict) -> dict:
    import onnx
    from onnxruntime.quantization import qdq_loss_debug as debug

    work = req["workdir"]
    float_aug, qdq_aug = os.path.join(work, "float_aug.onnx"), os.path.join(work, "qdq_aug.onnx")
    debug.modify_model_output_intermediate_tensors(req["model"], float_aug)
    debug.modify_model_output_intermediate_tensors(req["quantized"], qdq_aug)
    names, bs = req["input_names"], int(req["batch_size"])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        float_acts = debug.collect_activations(float_aug, _reader(req["samples"], names, bs))
        qdq_acts = debug.collect_activations(qdq_aug, _reader(req["samples"], names, bs))
        errors = debug.compute_activation_error(debug.create_activation_matching(qdq_acts, float_acts))
    sqnr = {name: e["xmodel_err"] for name, e in errors.items() if e.get("xmodel_err") is not None}
    model = onnx.load(req["model"], load_external_data=False)
    graph_inputs = {i.name for i in model.graph.input}
    constants = {i.name for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    ranking = []
    for node in model.graph.node:
        measured = [sqnr[o] for o in node.output if o in sqnr]
        if not measured:
            continue
        # The segment: this node and the producers of its inputs that were not measured
        # (a Conv whose output onnxruntime fuses with the Relu after it has no QDQ of its
        # own), back to measured tensors or the graph inputs.
        segment, boundary, stack, seen = [], [], [node], set()
        while stack:
            n = stack.pop()
            if n.name in seen:
                continue
            seen.add(n.name)
            segment.append(n)
            for i in n.input:
                if not i or i in constants:
                    continue
                if i in sqnr:
                    boundary.append(sqnr[i])
                elif i in graph_inputs:
                    boundary.append(math.inf)
                elif i in producer:
                    stack.append(producer[i])
        before = min(min(boundary, default=math.inf), 100.0)  # an exact input counts as 100 dB
        out = min(measured)
        ranking.append({"nodes": [n.name for n in reversed(segment)], "op_types": [n.op_type for n in reversed(segment)],
                        "sqnr_db": round(float(out), 3), "added_db": round(float(before - out), 3)})
    ranking.sort(key=lambda r: -r["added_db"])
    return {"ranking": ranking}


def main(request_path: str, response_path: str) -> int:
    with open(request_path, encoding="utf-8") as f:
        req = json.load(f)
    result = {"quantize": quantize, "preprocess": preprocess, "rank": rank}[req["action"]](req)
    with open(response_path, "w", encoding="utf-8") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
