"""The ONNX target's INT8 quantizer, for the shared driver (`export.int8.export_int8`).

For each candidate (the folded model, or its equalized twin) the float graph is exported with
tf2onnx, passed through onnxruntime's own pre-quantization step (`quant_pre_process`: a zero
Pad moved into its Conv, so no Pad runs in float between a DequantizeLinear and a
QuantizeLinear; its graph is checked against the exported one and dropped if it differs), and
quantized by onnxruntime (QDQ, u8 activations, s8 weights), calibrated batch by batch, the
ranges cached between attempts; `reduce_range` follows the CPU the file is for
(`export.onnx.cpu`). The file runs on onnxruntime's CPU provider. Its nodes can be ranked by
the SQNR each loses beyond its inputs, for the driver's fallback (`nodes_to_exclude`).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from keras_bn_ext.compare import input_specs
from keras_bn_ext.export.onnx.cpu import CpuTarget, cpu_target, detect_cpu
from keras_bn_ext.export.onnx.options import INT4_OPSET, OnnxInt8Options, OnnxOptions
from keras_bn_ext.export.options import ExportOptions
from keras_bn_ext.nonfinite import max_rel_err
from keras_bn_ext.progress import phase
from keras_bn_ext.progress import steps as counted_steps
from keras_bn_ext.quantization.calibration import EVAL_BATCH

__all__ = ["OnnxInt8Detail", "OnnxQuantizer", "Preprocess", "at_int4_opset"]

PROFILE_RUNS = 20  # profiled runs for `costly_nodes`
_RANK_SAMPLES = 256  # evaluation samples the fallback ranks nodes on
_CHECK_SAMPLES = 64  # evaluation samples the pre-processed graph is checked on
# onnxruntime's pre-step rewrites float arithmetic (a Pad into a Conv, constants folded): its
# graph must give the exported graph's outputs to float32 rounding, scaled to the output.
_PREPROCESS_RTOL = 1e-5


@dataclass
class Preprocess:
    """What onnxruntime's pre-quantization step did to the float graph that was quantized."""

    code: str  # "applied" | "rejected_mismatch" | "skipped_external_data" | "off"
    ops_before: dict
    ops_after: dict
    max_rel_err: float | None = None  # the pre-processed float graph against the exported one

    @property
    def removed(self) -> dict:
        """Op types the step removed (or merged into others), with how many."""
        return {op: n - self.ops_after.get(op, 0) for op, n in self.ops_before.items()
                if n > self.ops_after.get(op, 0)}

    def to_dict(self) -> dict:
        return {"code": self.code, "removed": self.removed, "max_rel_err": self.max_rel_err,
                "ops_before": self.ops_before, "ops_after": self.ops_after}


@dataclass
class OnnxInt8Detail:
    """The ONNX INT8 file's own fields (the report's "onnx" record)."""

    per_channel: bool
    reduce_range: bool
    target_cpu: CpuTarget
    opset: int
    preprocess: Preprocess | None
    weight_bits: int = 8
    clipping: dict | None = None  # 4-bit PTQ: the MSE-optimal clipping (`export.onnx.clip`)

    format = "QDQ"
    activation_type = "uint8"

    @property
    def weight_type(self) -> str:
        return "int4" if self.weight_bits == 4 else "int8"

    @property
    def measured_on_cpu(self) -> str:
        """The CPU the fidelity was measured on (this machine's onnxruntime): where it is not
        the target (8-bit weights for VNNI measured on AVX2), the numbers may differ there."""
        return detect_cpu().name

    def to_dict(self) -> dict:
        return {"format": self.format, "activation_type": self.activation_type, "weight_type": self.weight_type,
                "per_channel": self.per_channel, "reduce_range": self.reduce_range,
                "target_cpu": self.target_cpu.to_dict(), "measured_on_cpu": self.measured_on_cpu,
                "opset": self.opset, "preprocess": self.preprocess.to_dict() if self.preprocess else None,
                "clipping": self.clipping}


def at_int4_opset(proto):
    """`proto` moved to `INT4_OPSET` by onnx's version converter (int4 is DequantizeLinear's
    type from opset 21; tf2onnx writes at most 18), or itself where it is there already."""
    if next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0) >= INT4_OPSET:
        return proto
    from onnx import version_converter

    return version_converter.convert_version(proto, INT4_OPSET)


class OnnxFiles:
    """What the INT8 driver asks of an ONNX file, the same for every ONNX quantizer."""

    def copy(self, source: Path, destination: Path) -> None:
        shutil.copyfile(source, destination)

    def size(self, path: Path) -> int:
        return os.path.getsize(path)

    def op_counts(self, path: Path) -> dict:
        from keras_bn_ext.export.onnx.convert import file_op_counts

        return file_op_counts(path)


class OnnxQuantizer(OnnxFiles):
    """onnxruntime's static quantization of the exported graph, one candidate per tag."""

    can_rank = True

    def __init__(self, onnx: OnnxOptions, int8: OnnxInt8Options, model, data, options, work: Path):
        from keras_bn_ext.export.onnx.target import OnnxTarget

        self.onnx, self.int8, self.options, self.work = onnx, int8, options, work
        self.batch_size = int8.batch_size
        self.model, self.data = model, data
        self.names = [n for n, _, _ in input_specs(model)]
        self.cpu = cpu_target(int8.target_cpu)
        self.runner = OnnxTarget(OnnxOptions(provider="cpu"))  # INT8 kernels are the CPU provider's
        self.method = int8.method
        self.equalize_by_default = not int8.per_channel  # one weight range must serve every channel
        self.prepared: dict[str, Preprocess] = {}
        self.clipping: dict[str, dict] = {}
        self.calibration_npz, self.rank_npz = work / "calibration.npz", work / "rank.npz"
        np.savez(self.calibration_npz, **dict(zip(self.names, data.calibration)))
        np.savez(self.rank_npz, **{n: a[:_RANK_SAMPLES] for n, a in zip(self.names, data.evaluation)})

    def _outputs(self, file: Path, arrays):
        from keras_bn_ext.compare import output_names
        from keras_bn_ext.export.verify import run_arrays

        return run_arrays(self.runner, file, arrays, input_names=self.names, keras_names=output_names(self.model),
                          batch_size=EVAL_BATCH)[0]

    def float_file(self, candidate, tag: str) -> Path:
        """The float graph that is quantized: exported, then onnxruntime's pre-step (checked)."""
        from keras_bn_ext.export.onnx.convert import export_onnx, file_op_counts
        from keras_bn_ext.export.onnx.quantize import preprocess_onnx

        exported, pre = self.work / f"{tag}.float.onnx", self.work / f"{tag}.pre.onnx"
        if tag not in self.prepared:
            with phase("convert (tf2onnx)"):
                report = export_onnx(candidate, exported, options=ExportOptions(fold=False, batch_size=self.batch_size),
                                     onnx=OnnxOptions(opset=self.onnx.opset))
            if not self.int8.preprocess:
                self.prepared[tag] = Preprocess("off", {}, {})
            elif (self.work / f"{exported.name}.data").exists():  # onnxruntime's step writes one protobuf
                self.prepared[tag] = Preprocess("skipped_external_data", {}, {})
            else:
                with phase("onnxruntime pre-quantization"):
                    preprocess_onnx(exported, pre)
                    first = [a[:_CHECK_SAMPLES] for a in self.data.evaluation]
                    err = max_rel_err(self._outputs(exported, first), self._outputs(pre, first))
                code = "applied" if err <= _PREPROCESS_RTOL else "rejected_mismatch"
                self.prepared[tag] = Preprocess(code, report.op_counts, file_op_counts(pre), err)
        return pre if self.prepared[tag].code == "applied" else exported

    def quantize(self, candidate, tag: str, excluded: list[str]) -> Path:
        from keras_bn_ext.export.onnx.quantize import QuantizeSettings, quantize_onnx

        float_path, int8_path = self.float_file(candidate, tag), self.work / f"{tag}.int8.onnx"
        cache = self.work / f"{tag}.cache.json"
        if self.int8.weight_bits == 4:  # the quantizer's copy: weights clipped, opset 21 for int4
            float_path = self._clipped(float_path, tag)
        calibrated = cache.exists()  # the ranges of an earlier attempt are reused
        batches = -(-len(self.data.calibration[0]) // self.options.calibration_batch_size)
        with counted_steps("quantize (calibration cached)" if calibrated else "calibrate and quantize",
                           0 if calibrated else batches) as advance:
            settings = QuantizeSettings(per_channel=self.int8.per_channel, reduce_range=self.cpu.reduce_range,
                                        method=self.int8.method, batch_size=self.options.calibration_batch_size,
                                        weight_bits=self.int8.weight_bits)
            quantize_onnx(float_path, int8_path, self.calibration_npz, self.names, settings=settings,
                          nodes_to_exclude=excluded, cache=cache, on_batch=advance)
        return int8_path

    def _clipped(self, float_path: Path, tag: str) -> Path:
        import onnx

        from keras_bn_ext.export.onnx.clip import clip_weights_mse
        out = self.work / f"{tag}.w4clip.onnx"
        if not out.exists():
            with phase("MSE-optimal 4-bit weight ranges"):
                self.clipping[tag] = clip_weights_mse(float_path, out, per_channel=self.int8.per_channel)
                onnx.save_model(at_int4_opset(onnx.load(str(out))), str(out))
        return out

    def rank(self, float_file: Path, int8_file: Path, tag: str) -> list[dict]:
        from keras_bn_ext.export.onnx.quantize import rank_nodes

        return rank_nodes(float_file, int8_file, self.rank_npz, self.names, batch_size=EVAL_BATCH,
                          workdir=self.work)

    def costly_nodes(self, int8_file: Path, feed: dict, *, top: int = 5) -> list[dict]:
        """The INT8 file's compute nodes that cost most on onnxruntime's CPU provider, each with
        the QuantizeLinear/DequantizeLinear nodes around it (onnxruntime's profiler over
        `PROFILE_RUNS` runs of `feed`): {"node", "op", "ms", "qdq_ms"}, costliest first. The
        node names are the float graph's, so each can be kept in float (`nodes_to_exclude`)."""
        import onnx

        from keras_bn_ext.export.onnx.verify import run_onnxruntime

        _, meta = run_onnxruntime(int8_file, [feed], provider="cpu", profile=PROFILE_RUNS)
        node_ms = meta.get("node_ms") or {}
        graph = onnx.load(str(int8_file), load_external_data=False).graph
        producer = {out: n for n in graph.node for out in n.output}
        consumers: dict[str, list] = {}
        for n in graph.node:
            for name in n.input:
                consumers.setdefault(name, []).append(n)
        qdq = {"QuantizeLinear", "DequantizeLinear"}
        rows = []
        for n in graph.node:
            if n.op_type in qdq or not n.name:
                continue
            around = {p.name for i in n.input if (p := producer.get(i)) is not None and p.op_type in qdq}
            around |= {q.name for i in n.input if (p := producer.get(i)) is not None and p.op_type == "DequantizeLinear"
                       for q in [producer.get(p.input[0])] if q is not None and q.op_type == "QuantizeLinear"}
            around |= {c.name for o in n.output for c in consumers.get(o, []) if c.op_type == "QuantizeLinear"}
            if not around:
                continue  # not quantized: nothing to keep in float
            own = node_ms.get(n.name, {}).get("ms", 0.0)
            wrap = sum(node_ms.get(a, {}).get("ms", 0.0) for a in around)
            rows.append({"node": n.name, "op": n.op_type, "ms": round(own + wrap, 4), "qdq_ms": round(wrap, 4)})
        return sorted(rows, key=lambda r: -r["ms"])[:top]

    def detail(self, tag: str) -> OnnxInt8Detail:
        w4 = self.int8.weight_bits == 4
        return OnnxInt8Detail(per_channel=self.int8.per_channel, reduce_range=self.cpu.reduce_range and not w4,
                              target_cpu=self.cpu, opset=INT4_OPSET if w4 else self.onnx.opset,
                              preprocess=self.prepared.get(tag), weight_bits=self.int8.weight_bits,
                              clipping=self.clipping.get(tag))
