"""The ONNX INT8 file of a quantization-aware model, from its learned ranges (no calibration).

tf2onnx converts the QAT model's plain twin (`export.qat.export_model`), whose activation
markers it writes as QuantizeLinear/DequantizeLinear pairs. The ONNX graph is then finished
here:

- every activation pair gets the exact float32 scale and zero point the model computes
  (`ActivationQuantizer.quantization`; tf2onnx recomputes them in float64);
- every Conv/MatMul weight initializer becomes int8 (values in [-qmax, qmax]) behind a
  DequantizeLinear, its scale read back from the grid (max|w| / qmax per output channel,
  exact to an ulp), checked to lie on it;
- a Conv's bias becomes int32 at scale s_x * s_w (what onnxruntime's QLinearConv needs).

onnxruntime then fuses DequantizeLinear -> Conv -> QuantizeLinear into its integer kernels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from keras_bn_ext.errors import ExportError
from keras_bn_ext.export.onnx.int8 import OnnxFiles, at_int4_opset
from keras_bn_ext.export.onnx.options import INT4_OPSET, OnnxOptions
from keras_bn_ext.export.options import ExportOptions
from keras_bn_ext.export.qat import export_model, per_channel_of, weight_qmax_of
from keras_bn_ext.progress import phase

__all__ = ["QatOnnxQuantizer", "write_qdq"]

# A weight that lies on its grid is q * s up to float32 rounding of that product.
_GRID_RTOL = 1e-5
# tf2onnx's float64 scale against the model's float32 one: within a few ulp.
_SCALE_RTOL = 1e-5
# 4-bit weights ([-7, 7]) are written as int4, DequantizeLinear's type from opset 21.
INT4_QMAX = 7


def write_qdq(float_path: Path, out_path: Path, *, grids: list[tuple[np.float32, int]], qmax: int,
              per_channel: bool) -> dict:
    """Finish tf2onnx's graph at `float_path` as described above; returns counts. 4-bit
    weights (qmax 7) are stored as int4, which DequantizeLinear takes from opset 21: the graph
    is first moved to opset 21 by onnx's version converter (tf2onnx writes at most 18)."""
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load(str(float_path))
    storage = np.int8
    if qmax <= INT4_QMAX:
        import ml_dtypes

        storage = ml_dtypes.int4
        proto = at_int4_opset(proto)
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    counts = {"activations": 0, "weights": 0, "biases": 0}

    # 1. The activation grids, exact.
    exact = {}
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or node.input[1] not in inits:
            continue
        scale = float(numpy_helper.to_array(inits[node.input[1]]))
        zero_point = int(numpy_helper.to_array(inits[node.input[2]]))
        match = [s for s, z in grids if z == zero_point and abs(float(s) - scale) <= _SCALE_RTOL * float(s)]
        if not match:
            raise ExportError(f"QuantizeLinear '{node.name}' (scale {scale:.6g}, zero point {zero_point}) matches "
                              "no activation quantizer of the model")
        exact[node.input[1]] = match[0]
        counts["activations"] += node.op_type == "QuantizeLinear"
    for name, scale in exact.items():
        inits[name].CopyFrom(numpy_helper.from_array(np.asarray(scale, np.float32), name))

    def dq_scale_of(tensor):
        node = producer.get(tensor)
        if node is None or node.op_type != "DequantizeLinear" or node.input[1] not in inits:
            return None
        return np.float32(numpy_helper.to_array(inits[node.input[1]]))

    # 2. Weights (and Conv biases) as integers behind DequantizeLinear.
    new_nodes = []
    for node in graph.node:
        if node.op_type == "Conv":
            axis = 0
        elif node.op_type in ("MatMul", "Gemm"):
            axis = 1
        else:
            continue
        if len(node.input) < 2 or node.input[1] not in inits:
            continue
        w_name = node.input[1]
        w = numpy_helper.to_array(inits[w_name]).astype(np.float32)
        if not np.all(np.isfinite(w)):
            raise ExportError(f"the weights of {node.op_type} '{node.name}' hold NaN or infinity")
        if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
            axis = 0
        reduce = tuple(i for i in range(w.ndim) if i != axis)
        peak = np.max(np.abs(w), axis=reduce) if per_channel else np.max(np.abs(w)).reshape(1)
        scale = np.where(peak > 0, peak / np.float32(qmax), np.float32(1.0)).astype(np.float32)
        shape = [1] * w.ndim
        shape[axis] = -1
        s_b = scale.reshape(shape) if per_channel else scale[0]
        q = np.round(w / s_b)
        off = float(np.max(np.abs(q * s_b - w)))
        if off > _GRID_RTOL * float(np.max(np.abs(w)) or 1.0) or np.max(np.abs(q)) > qmax:
            raise ExportError(f"the weights of {node.op_type} '{node.name}' are not on a {qmax}-level grid "
                              f"(off by {off:.3g}): not a QAT layer's kernel")
        q_name, s_name, z_name = f"{w_name}_quantized", f"{w_name}_scale", f"{w_name}_zero_point"
        graph.initializer.extend([
            numpy_helper.from_array(q.astype(storage), q_name),
            numpy_helper.from_array(scale if per_channel else scale[:1].reshape(()), s_name),
            numpy_helper.from_array(np.zeros(scale.shape if per_channel else (), storage), z_name)])
        attrs = {"axis": axis} if per_channel else {}
        new_nodes.append((node, helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [f"{w_name}_dq"],
                                                  name=f"{w_name}_DequantizeLinear", **attrs)))
        node.input[1] = f"{w_name}_dq"
        counts["weights"] += 1
        s_x = dq_scale_of(node.input[0])
        if node.op_type == "Conv" and len(node.input) > 2 and node.input[2] in inits and s_x is not None:
            b_name = node.input[2]
            b = numpy_helper.to_array(inits[b_name]).astype(np.float32)
            b_scale = (s_x * (scale if per_channel else np.full(b.shape, scale[0]))).astype(np.float32)
            graph.initializer.extend([
                numpy_helper.from_array(np.round(b / b_scale).astype(np.int32), f"{b_name}_quantized"),
                numpy_helper.from_array(b_scale, f"{b_name}_scale"),
                numpy_helper.from_array(np.zeros(b.shape, np.int32), f"{b_name}_zero_point")])
            new_nodes.append((node, helper.make_node(
                "DequantizeLinear", [f"{b_name}_quantized", f"{b_name}_scale", f"{b_name}_zero_point"],
                [f"{b_name}_dq"], name=f"{b_name}_DequantizeLinear", axis=0)))
            node.input[2] = f"{b_name}_dq"
            counts["biases"] += 1
    for consumer, dq in new_nodes:  # each DequantizeLinear just before its consumer (topological order)
        index = list(graph.node).index(consumer)
        graph.node.insert(index, dq)
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    onnx.checker.check_model(proto)
    onnx.save_model(proto, str(out_path))
    return counts


class QatOnnxQuantizer(OnnxFiles):
    """The shared INT8 driver's quantizer for a QAT model: ranges from the model."""

    can_rank = False
    equalize_by_default = False
    method = "learned (quantization-aware training)"

    def __init__(self, onnx: OnnxOptions, model, data, options, work: Path):
        from keras_bn_ext.export.onnx.target import OnnxTarget
        from keras_bn_ext.qat.model import quantizers_of

        self.onnx, self.model, self.data, self.options, self.work = onnx, model, data, options, work
        self.runner = OnnxTarget(OnnxOptions(provider="cpu"))  # INT8 kernels are the CPU provider's
        self.qmax, self.per_channel = weight_qmax_of(model), per_channel_of(model)
        self.grids = [q.quantization() for q in quantizers_of(model)]
        self.counts: dict = {}

    def float_file(self, candidate, tag: str) -> Path:
        from keras_bn_ext.export.onnx.convert import export_onnx

        path = self.work / f"{tag}.float.onnx"
        if not path.exists():
            with phase("convert the float twin (tf2onnx)"):
                export_onnx(export_model(candidate, markers=False), path, options=ExportOptions(fold=False),
                            onnx=OnnxOptions(opset=self.onnx.opset))
        return path

    def quantize(self, candidate, tag: str, excluded: list[str]) -> Path:
        from keras_bn_ext.export.onnx.convert import export_onnx

        if excluded:
            raise ExportError("a QAT model's file is written as it was trained; no node is kept in float")
        marked, out = self.work / f"{tag}.marked.onnx", self.work / f"{tag}.int8.onnx"
        with phase("convert with the learned ranges (tf2onnx)"):
            export_onnx(export_model(candidate), marked, options=ExportOptions(fold=False),
                        onnx=OnnxOptions(opset=self.onnx.opset))
        with phase("integer weights and exact grids"):
            self.counts = write_qdq(marked, out, grids=self.grids, qmax=self.qmax, per_channel=self.per_channel)
        return out

    def detail(self, tag: str):
        from keras_bn_ext.export.onnx.cpu import detect_cpu
        from keras_bn_ext.export.onnx.int8 import OnnxInt8Detail

        four = self.qmax <= INT4_QMAX
        return OnnxInt8Detail(per_channel=self.per_channel, reduce_range=self.qmax == 63, target_cpu=detect_cpu(),
                              opset=INT4_OPSET if four else self.onnx.opset, preprocess=None,
                              weight_bits=4 if four else 8)
