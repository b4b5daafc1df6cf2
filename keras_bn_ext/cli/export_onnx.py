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
    Phases,
    add_common_arguments,
    fmt,
    positive_int,
    run,
)

PROG = "bn-export-onnx"
# The ONNX graph computes the same float32 operations in another order (other conv
# algorithms, fused bias): a few ulp per layer, ~1e-7 of the output's magnitude on
# small nets and ~1e-6 on ResNet-sized ones. 1e-5 absolute and relative keep a
# margin and still catch a changed weight, which errs by O(1e-2) or more.
DEFAULT_ATOL = 1e-5
DEFAULT_RTOL = 1e-5
# --fp16: float16 keeps 11 significant bits (unit roundoff 4.9e-4) in every weight and
# intermediate; over tens of layers that reaches ~1e-3 of the output's magnitude
# (measured 6e-5 on LeNet, 7e-4 on MobileNetV2). 1e-2 relative / 1e-3 absolute.
FP16_ATOL = 1e-3
FP16_RTOL = 1e-2
OPSETS = range(13, 19)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Export a .keras model to ONNX with tf2onnx (BatchNormalization folded "
        "first), check it with onnx.checker, and verify its outputs against the Keras model "
        "on onnxruntime (CUDA when it really runs, else the CPU; the report says which).",
        epilog=EXIT_CODES_HELP,
    )
    add_common_arguments(
        parser,
        atol=None,
        rtol=None,
        samples_help="seeded random batches of each batch size (1 and 8, or --batch-size) to "
        "verify on (default: 3)",
        tolerance_help=f". Defaults: atol {DEFAULT_ATOL:g} and rtol {DEFAULT_RTOL:g}; with --fp16 "
        f"atol {FP16_ATOL:g} and rtol {FP16_RTOL:g}",
    )
    parser.add_argument("-o", "--output", help="output .onnx file (default: MODEL.onnx beside the input)")
    parser.add_argument("--no-fold", action="store_true", help="export without folding BatchNormalization")
    parser.add_argument("--opset", type=int, default=17, choices=OPSETS, metavar="N",
                        help="ONNX opset, 13-18 (default: 17)")
    parser.add_argument("--batch-size", type=positive_int, metavar="N",
                        help="fix the batch dimension (default: symbolic, named 'batch')")
    parser.add_argument("--provider", choices=("auto", "cuda", "cpu"), default="auto",
                        help="onnxruntime execution provider: auto = CUDA then CPU (default)")
    parser.add_argument("--require-gpu", action="store_true",
                        help="fail (exit 2) when onnxruntime falls back to the CPU")
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
    if args.atol is None:
        args.atol = FP16_ATOL if args.fp16 else DEFAULT_ATOL
    if args.rtol is None:
        args.rtol = FP16_RTOL if args.fp16 else DEFAULT_RTOL
    from keras_bn_ext.model_io import (
        atomic_output,
        check_model_file,
        check_output_path,
        import_custom_modules,
        load_model,
    )
    from keras_bn_ext.onnx_export import export_onnx
    from keras_bn_ext.onnx_verify import load_inputs_npz, verify_onnx

    phase = Phases()
    output = Path(args.output) if args.output else Path(args.model).with_suffix(".onnx")
    check_model_file(args.model)  # the input's own errors come first
    check_output_path(output, inputs=[args.model] + ([args.inputs] if args.inputs else []), force=args.force)
    import_custom_modules(args.custom_module)
    with phase("load"):
        model = load_model(args.model, safe_mode=not args.unsafe)
    inputs = load_inputs_npz(model, args.inputs) if args.inputs else None
    if inputs is not None and args.batch_size and inputs[0].shape[0] != args.batch_size:
        from keras_bn_ext.errors import InputDataError

        raise InputDataError(
            f"--batch-size {args.batch_size} but {args.inputs} holds batches of {inputs[0].shape[0]}"
        )
    # Export and verify a temporary file; it becomes OUTPUT only when no error stops the
    # run (a failed verification still renames it, for inspection, and exits 1).
    with atomic_output(output) as tmp:
        with phase("export"):  # fold, convert, onnx.checker, write
            export = export_onnx(
                model, tmp, fold=not args.no_fold, opset=args.opset, batch_size=args.batch_size, fp16=args.fp16
            )
        with phase("verify"):
            verification = verify_onnx(
                model,
                tmp,
                inputs=inputs,
                samples=args.samples,
                batch_sizes=(args.batch_size,) if args.batch_size else (1, 8),
                provider=args.provider,
                require_gpu=args.require_gpu,
                atol=args.atol,
                rtol=args.rtol,
                benchmark=args.benchmark,
            )
    result = {
        "input": str(args.model),
        "output": str(output),
        "opset": args.opset,
        "precision": "float16 weights, float32 inputs/outputs" if args.fp16 else "float32",
        "folded": not args.no_fold,
        "bn_folded": export.bn_folded,
        "fold": export.fold.to_dict() if export.fold else None,
        "provider": verification.provider,
        "fallback_reason": verification.fallback_reason,
        "onnxruntime_version": verification.onnxruntime_version,
        "inputs": export.inputs,
        "outputs": [vars(o) for o in verification.comparison.outputs],
        "op_counts": export.op_counts,
        "samples": "npz" if inputs is not None else args.samples,
        "batch_sizes": verification.batch_sizes,
        "atol": args.atol,
        "rtol": args.rtol,
        "latency_ms": verification.latency_ms,
        "timings_s": phase.seconds,
        "passed": verification.passed,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_summary(result)
    return EXIT_OK if verification.passed else EXIT_VERIFY_FAILED


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
    console.print(f"onnxruntime {result['onnxruntime_version']} ran on [bold]{result['provider']}[/bold]")
    if result["fallback_reason"]:
        console.print(f"  fell back to the CPU: {result['fallback_reason']}")
    table = Table(title="ONNX outputs vs Keras outputs")
    for column in ("output", "max abs err", "max rel err", "mean abs err", "result"):
        table.add_column(column)
    for o in result["outputs"]:
        verdict = "[green]passed[/green]" if o["passed"] else "[red]FAILED[/red]"
        table.add_row(o["name"], fmt(o["max_abs_err"]), fmt(o["max_rel_err"]), fmt(o["mean_abs_err"]), verdict)
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
    if not result["passed"]:
        console.print(f"[red]verification failed; {result['output']} is kept for inspection[/red]")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(PROG, lambda: _work(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
