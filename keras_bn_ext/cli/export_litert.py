"""bn-export-litert: export a .keras model to LiteRT (TFLite), folded first, and verify it on
ai-edge-litert's interpreter."""

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
    run,
    timed,
    verdict,
)
from keras_bn_ext.export.onnx import options

PROG = "bn-export-litert"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Export a .keras (or legacy .h5) model to LiteRT (.tflite) with TensorFlow's LiteRT converter "
        "(BatchNormalization folded first; signature 'serving_default' with the Keras input and output names, "
        "dynamic batch), and verify it against the Keras model on ai-edge-litert's interpreter.",
        epilog=EXIT_CODES_HELP,
    )
    sizes = " and ".join(map(str, options.BATCH_SIZES))
    add_common_arguments(
        parser, atol=None, rtol=None,
        samples_help=f"seeded random batches of each batch size ({sizes}, resized on the interpreter) to verify on "
                     f"(default: {options.SAMPLES})",
        tolerance_help=f". Defaults: atol {options.FP32_ATOL:g} and rtol {options.FP32_RTOL:g}; with --fp16 atol "
                       f"{options.FP16_ATOL:g} and rtol {options.FP16_RTOL:g}",
    )
    parser.add_argument("-o", "--output", help="output .tflite file (default: MODEL.tflite beside the input)")
    parser.add_argument("--no-fold", action="store_true", help="export without folding BatchNormalization")
    parser.add_argument("--inputs", metavar="NPZ",
                        help="verify on these arrays (an .npz keyed by input name) instead of random batches")
    parser.add_argument("--fp16", action="store_true",
                        help="float16 weights (the converter's float16 quantization), verified with float16 "
                             "tolerances")
    parser.add_argument("--benchmark", action="store_true", help="also report the interpreter's median latency")
    return parser


def _work(args) -> int:
    from keras_bn_ext.export.litert.pipeline import export_litert_verified
    from keras_bn_ext.export.onnx.verify import load_inputs_npz

    output = Path(args.output) if args.output else Path(args.model).with_suffix(".tflite")
    seconds: dict[str, float] = {}
    with timed(seconds, "load"):
        model = load_input_model(args, output, other_inputs=[args.inputs] if args.inputs else [])
    inputs = load_inputs_npz(model, args.inputs) if args.inputs else None
    result = export_litert_verified(model, output, fold=not args.no_fold, exclude=args.exclude, fp16=args.fp16,
                                    inputs=inputs, samples=args.samples, atol=args.atol, rtol=args.rtol,
                                    benchmark=args.benchmark)
    result.timings_s = {**seconds, **result.timings_s}
    report = {"input": str(args.model), **result.to_dict(), "samples": "npz" if inputs is not None else args.samples}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_summary(report)
    return EXIT_OK if result.passed else EXIT_VERIFY_FAILED


def _print_summary(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    v = r["verification"]
    if r["fold"] is not None:
        console.print(f"folded {r['fold']['bn_folded']} of {r['fold']['bn_total']} BatchNormalization layers")
    ops = ", ".join(f"{k} {n}" for k, n in v["op_counts"].items())
    names = ", ".join(i["name"] for i in r["inputs"])
    console.print(f"wrote {r['output']} ({r['precision']}; signature serving_default: {names} -> "
                  f"{', '.join(r['outputs_names'])}; {ops})")
    table = Table(title=f"LiteRT outputs vs Keras outputs (ai-edge-litert {v['runtime_version']}, batch sizes "
                        f"{v['batch_sizes']})")
    for column in ("output", "max abs err", "max rel err", "mean abs err", "result"):
        table.add_column(column)
    for o in v["outputs"]:
        table.add_row(o["name"], fmt(o["max_abs_err"]), fmt(o["max_rel_err"]), fmt(o["mean_abs_err"]),
                      verdict(o["passed"]))
    console.print(table)
    if v["latency_ms"]:
        console.print("median latency (ms): " + ", ".join(f"batch {b}: {ms:.3f}" for b, ms in v["latency_ms"].items()))
    if not r["passed"]:
        console.print(f"[red]verification failed; {r['output']} is kept for inspection[/red]")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(PROG, lambda: _work(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
