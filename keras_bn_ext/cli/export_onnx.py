"""bn-export-onnx: export a .keras model to ONNX (folded first) and verify it on onnxruntime."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from keras_bn_ext.cli._common import (
    EXIT_CODES_HELP,
    EXIT_OK,
    EXIT_VERIFY_FAILED,
    add_common_arguments,
    fmt,
    load_input_model,
    positive_int,
    run,
    timed,
    verdict,
)
from keras_bn_ext.export.onnx import options

PROG = "bn-export-onnx"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Export a .keras (or legacy .h5) model to ONNX with tf2onnx (BatchNormalization folded "
        "first), check it with onnx.checker, and verify its outputs against the Keras model "
        "on onnxruntime (CUDA when it really runs, else the CPU; the report says which).",
        epilog=EXIT_CODES_HELP,
    )
    sizes = " and ".join(map(str, options.BATCH_SIZES))
    add_common_arguments(
        parser,
        atol=None,
        rtol=None,
        samples_help=f"seeded random batches of each batch size ({sizes}, or --batch-size) to "
        f"verify on (default: {options.SAMPLES})",
        tolerance_help=f". Defaults: atol {options.FP32_ATOL:g} and rtol {options.FP32_RTOL:g}; "
        f"with --fp16 atol {options.FP16_ATOL:g} and rtol {options.FP16_RTOL:g}",
    )
    opsets = options.SUPPORTED_OPSETS
    parser.add_argument("-o", "--output", help="output .onnx file (default: MODEL.onnx beside the input)")
    parser.add_argument("--no-fold", action="store_true", help="export without folding BatchNormalization")
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
    parser.add_argument("--inputs", metavar="NPZ",
                        help="verify on these arrays (an .npz keyed by input name) instead of "
                             "random batches")
    parser.add_argument("--fp16", action="store_true",
                        help="float16 weights and arithmetic, float32 inputs and outputs "
                             "(verified with float16 tolerances)")
    parser.add_argument("--benchmark", action="store_true",
                        help="also report median latency of Keras (tf.function) and onnxruntime")
    return parser


def _work(args) -> int:
    from keras_bn_ext.errors import InputDataError
    from keras_bn_ext.export.onnx.pipeline import export_verified
    from keras_bn_ext.export.onnx.verify import load_inputs_npz

    output = Path(args.output) if args.output else Path(args.model).with_suffix(".onnx")
    seconds: dict[str, float] = {}
    with timed(seconds, "load"):
        model = load_input_model(args, output, other_inputs=[args.inputs] if args.inputs else [])
    inputs = load_inputs_npz(model, args.inputs) if args.inputs else None
    if inputs is not None and args.batch_size and inputs[0].shape[0] != args.batch_size:
        raise InputDataError(
            f"--batch-size {args.batch_size} but {args.inputs} holds batches of {inputs[0].shape[0]}"
        )
    result = export_verified(
        model, output, fold=not args.no_fold, exclude=args.exclude, opset=args.opset,
        batch_size=args.batch_size, fp16=args.fp16, inputs=inputs, samples=args.samples,
        provider=args.provider, require_gpu=args.require_gpu, require_all_gpu=args.require_all_gpu,
        atol=args.atol, rtol=args.rtol,
        benchmark=args.benchmark,
    )
    result.timings_s = {**seconds, **result.timings_s}
    report = {"input": str(args.model), **result.to_dict(),
              "samples": "npz" if inputs is not None else args.samples}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_summary(report)
    return EXIT_OK if result.passed else EXIT_VERIFY_FAILED


def _print_summary(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    fold = result["fold"]
    if fold is not None:
        console.print(
            f"folded {fold['bn_folded']} of {fold['bn_total']} BatchNormalization layers"
            + (f" ({len(fold['kept'])} kept: see bn-fold for reasons)" if fold["kept"] else "")
        )
    ops = ", ".join(f"{k} {v}" for k, v in result["op_counts"].items())
    console.print(f"wrote {result['output']} (opset {result['opset']}; {ops})")
    for guard in result["guards"]:
        console.print(f"  guarded {guard}")
    console.print(f"onnxruntime {result['onnxruntime_version']} ran on [bold]{result['provider']}[/bold]")
    if result["fallback_reason"]:
        console.print(f"  fell back to the CPU: {result['fallback_reason']}")
    placement = result["placement"]
    if placement and (placement["cpu_nodes"] or placement["memcpy_nodes"]):
        nodes = Table(title=f"nodes onnxruntime placed on the CPU inside the CUDA session "
                            f"({placement['memcpy_nodes']} Memcpy nodes inserted)")
        for column in ("op", "node", "compute", "onnxruntime's reason"):
            nodes.add_column(column)
        for n in placement["cpu_nodes"]:
            nodes.add_row(n["op_type"], n["name"], "yes" if n["compute"] else "no", n["reason"])
        console.print(nodes)
    table = Table(title="ONNX outputs vs Keras outputs")
    for column in ("output", "max abs err", "max rel err", "mean abs err", "result"):
        table.add_column(column)
    for o in result["outputs"]:
        result_text = verdict(o["passed"])
        table.add_row(o["name"], fmt(o["max_abs_err"]), fmt(o["max_rel_err"]), fmt(o["mean_abs_err"]), result_text)
    console.print(table)
    console.print(
        f"batch sizes {result['batch_sizes']}; {result['precision']}: atol {fmt(result['atol'])}, "
        f"rtol {fmt(result['rtol'])}"
    )
    if result["latency_ms"]:
        bench = Table(title="median latency (ms)")
        for column in ("batch", "Keras tf.function", "onnxruntime", "speed-up"):
            bench.add_column(column)
        for bs, row in result["latency_ms"].items():
            k, o = row["keras_tf_function"], row["onnxruntime"]
            bench.add_row(bs, f"{k:.3f}", f"{o:.3f}", f"{k / o:.2f}x" if o else "-")
        console.print(bench)
    exact = result["exact_arithmetic"]
    if exact:
        result_text = verdict(exact["passed"])
        console.print(
            f"above tolerance in float32; against the model in float64 (exact arithmetic): Keras "
            f"{fmt(exact['original_max_rel_err'])}, ONNX {fmt(exact['candidate_max_rel_err'])} relative — "
            f"the export adds no error beyond float32 rounding: {result_text}"
        )
    if not result["passed"]:
        console.print(f"[red]verification failed; {result['output']} is kept for inspection[/red]")
        if result["diagnosis"]:
            console.print(f"  {result['diagnosis']}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(PROG, lambda: _work(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
