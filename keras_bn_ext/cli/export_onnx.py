"""bn-export-onnx: export a .keras model to ONNX (folded first) and verify it on onnxruntime."""

from __future__ import annotations

import argparse
import sys

from keras_bn_ext.cli._export import export_float, export_int8_file, int8_usage_error, run_export_cli
from keras_bn_ext.cli._inputs import qdq_options
from keras_bn_ext.cli._output import exact_line, fmt, output_table
from keras_bn_ext.cli._args import (EXIT_CODES_HELP, Parser, add_export_arguments, add_int8_arguments,
                                    add_qdq_arguments, positive_int)
from keras_bn_ext.export.onnx import options

PROG = "bn-export-onnx"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG,
        description="Export a .keras (or legacy .h5) model to ONNX with tf2onnx (BatchNormalization folded "
        "first), check it with onnx.checker, and verify its outputs against the Keras model "
        "on onnxruntime (CUDA when it really runs, else the CPU; the report says which).",
        epilog=EXIT_CODES_HELP,
    )
    add_export_arguments(parser, output_help="output .onnx file (default: MODEL.onnx beside the input)",
                         batches=", or --batch-size",
                         fp16_help="float16 weights and arithmetic, float32 inputs and outputs",
                         benchmark_help="also report median latency of Keras (tf.function) and onnxruntime (the INT8 "
                                        "export always times the float and the INT8 file on onnxruntime's CPU "
                                        "provider)")
    opsets = options.SUPPORTED_OPSETS
    parser.add_argument("--opset", type=int, default=options.DEFAULT_OPSET, choices=opsets, metavar="N",
                        help=f"ONNX opset, {opsets.start}-{opsets.stop - 1} (default: {options.DEFAULT_OPSET})")
    parser.add_argument("--batch-size", type=positive_int, metavar="N",
                        help="fix the batch dimension (default: symbolic, named "
                             f"'{options.BATCH_DIM}')")
    parser.add_argument("--provider", choices=options.PROVIDERS, default="auto",
                        help="onnxruntime execution provider: auto = CUDA then CPU (default)")
    parser.add_argument("--require-gpu", action="store_true",
                        help="fail (exit 2) when onnxruntime falls back to the CPU")
    parser.add_argument("--require-all-gpu", action="store_true",
                        help="fail (exit 2) unless CUDA ran and every compute node was placed on it "
                             "(shape computations onnxruntime keeps on the CPU on purpose excepted)")
    gib = options.EXTERNAL_DATA_THRESHOLD / (1 << 30)
    parser.add_argument("--external-data", action="store_true",
                        help="write the weights to OUT.onnx.data beside the model (ONNX external data; model and "
                             f"data file are written together or not at all). Automatic above {gib:g} GiB of "
                             "weights: a protobuf cannot exceed 2 GiB")
    parser.add_argument("--conversion", choices=options.CONVERSIONS, default="structure",
                        help="structure (default): tf2onnx converts the model with its kernels as inputs and the "
                             "values are attached after, at a small multiple of the weights' memory; frozen: "
                             "tf2onnx freezes every variable (its own route, ~260 bytes of memory per parameter)")
    _add_int8_arguments(parser)
    return parser


def _add_int8_arguments(parser: argparse.ArgumentParser) -> None:
    group = add_int8_arguments(
        parser, title="INT8 (onnxruntime static quantization, QDQ: u8 activations, s8 weights; verified on real "
                      "data against the float Keras model on onnxruntime's CPU provider)",
        output="MODEL.int8.onnx",
        equalize_help="cross-layer equalization before quantizing (an exact transform, verified): auto = on with "
                      "--per-tensor (the better of with and without kept), and tried when per-channel misses a "
                      "criterion (default)")
    add_qdq_arguments(group)
    group.add_argument("--latency-first", action="store_true",
                       help="when the INT8 file runs slower than the float one on onnxruntime's CPU provider, keep "
                            "its costliest quantized nodes (profiled) in float one by one, up to --fallback-budget, "
                            "while the criteria pass and it gets faster")


def _target(args):
    from keras_bn_ext.export.onnx.options import OnnxOptions
    from keras_bn_ext.export.onnx.target import OnnxTarget

    return OnnxTarget(OnnxOptions(
        opset=args.opset, conversion=args.conversion, external_data=True if args.external_data else None,
        provider=args.provider, require_gpu=args.require_gpu, require_all_gpu=args.require_all_gpu),
        int8=qdq_options(args))


def _work(args) -> int:
    if args.int8 or args.eval_data:  # --eval alone: a QAT model's INT8 file from its learned ranges
        return export_int8_file(args, target=lambda: _target(args), suffix=".int8.onnx", what="ONNX",
                                lines=lambda console, r: qdq_lines(console, r.detail))
    return export_float(args, target=lambda: _target(args), suffix=".onnx", what="ONNX",
                        batch_size=args.batch_size, printer=_print_summary)


def _print_summary(result) -> None:
    """The table of an ONNX `ExportResult`, read from its typed fields (its records included)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    written, v = result.export, result.verification.detail  # verify_onnx's VerificationReport
    e = written.detail  # export_onnx's ExportReport
    if written.fold is not None:
        console.print(
            f"folded {written.fold.bn_folded} of {written.fold.bn_total} BatchNormalization layers"
            + (f" ({len(written.fold.kept)} kept: see bn-fold for reasons)" if written.fold.kept else "")
        )
    ops = ", ".join(f"{k} {n}" for k, n in written.op_counts.items())
    console.print(f"wrote {written.path} (opset {e.opset}; {ops})")
    if written.companions:
        console.print(f"  weights in {written.companions[0]} ({e.external_data_bytes:,} bytes, ONNX external data)")
    if e.conversion_fallback:
        console.print(f"  [yellow]{e.conversion_fallback}[/yellow]")
    for guard in e.guards:
        console.print(f"  guarded {guard}")
    console.print(f"onnxruntime {v.onnxruntime_version} ran on [bold]{v.provider}[/bold]")
    if v.fallback_reason:
        console.print(f"  fell back to the CPU: {v.fallback_reason}")
    placement = v.placement
    if placement and (placement.cpu_nodes or placement.memcpy_nodes):
        nodes = Table(title=f"nodes onnxruntime placed on the CPU inside the CUDA session "
                            f"({placement.memcpy_nodes} Memcpy nodes inserted)")
        for column in ("op", "node", "compute", "onnxruntime's reason"):
            nodes.add_column(column)
        for n in placement.cpu_nodes:
            nodes.add_row(n.op_type, n.name, "yes" if n.compute else "no", n.reason)
        console.print(nodes)
    console.print(output_table("ONNX outputs vs Keras outputs", v.comparison.outputs))
    console.print(
        f"batch sizes {v.batch_sizes}; {result.precision}: atol {fmt(v.comparison.atol)}, "
        f"rtol {fmt(v.comparison.rtol)}"
    )
    if v.latency_ms:
        bench = Table(title="median latency (ms)")
        for column in ("batch", "Keras tf.function", "onnxruntime", "speed-up"):
            bench.add_column(column)
        for bs, row in v.latency_ms.items():
            k, o = row["keras_tf_function"], row["onnxruntime"]
            bench.add_row(str(bs), f"{k:.3f}", f"{o:.3f}", f"{k / o:.2f}x" if o else "-")
        console.print(bench)
    if v.exact:
        console.print("above tolerance in float32; "
                      + exact_line(v.exact, original="Keras", candidate="ONNX", what="the export"))
    if not result.passed:
        console.print(f"[red]verification failed; {written.path} is kept for inspection[/red]")
        if v.diagnosis:
            console.print(f"  {v.diagnosis}")


def qdq_lines(console, detail) -> None:
    """What only a QDQ graph's INT8 report says (an `OnnxInt8Detail`): the CPU it is for, the
    weight format, onnxruntime's pre-step. Shared with bn-export-openvino, which compiles it."""
    cpu = detail.target_cpu
    console.print(f"target CPU {cpu.name} ({'this machine' if cpu.detected else 'given'}): "
                  f"reduce_range={detail.reduce_range}: {cpu.reason}")
    if detail.measured_on_cpu != cpu.name:
        console.print(f"  [yellow]measured on this {detail.measured_on_cpu} CPU, not on the {cpu.name} target: "
                      "its int8 kernels may give other numbers there[/yellow]")
    console.print(f"QDQ u8/s8, {'per-channel' if detail.per_channel else 'per-tensor'} weights, opset {detail.opset}")
    pre = detail.preprocess
    if pre is not None and pre.code != "off":
        removed = ", ".join(f"{op} {n}" for op, n in pre.removed.items()) or "nothing"
        console.print({"applied": f"onnxruntime pre-quantization: removed {removed} "
                                  f"(float graph within {fmt(pre.max_rel_err)} of the export)",
                       "rejected_mismatch": f"[yellow]onnxruntime pre-quantization not used: its graph was "
                                            f"{fmt(pre.max_rel_err)} off the export[/yellow]",
                       "skipped_external_data": "onnxruntime pre-quantization skipped: the graph has "
                                                "external data"}[pre.code])


def _int8_usage_errors(args) -> str | None:
    if args.fp16 and args.external_data:
        return "--fp16 cannot be combined with --external-data"
    return int8_usage_error(args, float_only=("--require-gpu", "--require-all-gpu", "--external-data"))


def main(argv: list[str] | None = None) -> int:
    return run_export_cli(PROG, build_parser(), argv, _work, _int8_usage_errors)


if __name__ == "__main__":
    sys.exit(main())
