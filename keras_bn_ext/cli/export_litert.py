"""bn-export-litert: export a .keras model to LiteRT (TFLite), folded first, and verify it on
ai-edge-litert's interpreter."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from keras_bn_ext.cli._args import EXIT_CODES_HELP, Parser, add_common_arguments, add_data_key_argument, add_int8_arguments
from keras_bn_ext.cli._inputs import int8_data, int8_options, load_input_model, preflight, verification_inputs
from keras_bn_ext.cli._output import finish_int8, print_export
from keras_bn_ext.cli._run import EXIT_OK, EXIT_VERIFY_FAILED, run, timed
from keras_bn_ext.export import options

PROG = "bn-export-litert"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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
    add_data_key_argument(parser, flags="--inputs, --int8 and --eval")
    parser.add_argument("--fp16", action="store_true",
                        help="float16 weights (the converter's float16 quantization), verified with float16 "
                             "tolerances")
    parser.add_argument("--benchmark", action="store_true", help="also report the interpreter's median latency")
    add_int8_arguments(
        parser, title="INT8 (full-integer LiteRT, float32 inputs and outputs; calibrated and judged on real data "
                      "against the float Keras model as the ONNX INT8 file is)",
        output="MODEL.int8.tflite",
        equalize_help="cross-layer equalization (an exact transform, verified): auto = tried when the plain file "
                      "misses a criterion, the better kept (default)")
    return parser


def _work_int8(args) -> int:
    output = Path(args.output) if args.output else Path(args.model).with_suffix(".int8.tflite")
    preflight(args, output, data_files=[args.int8, args.eval_data])  # before TensorFlow is imported
    from keras_bn_ext.export.int8 import export_int8

    seconds: dict[str, float] = {}
    with timed(seconds, "load"):
        model = load_input_model(args, output, data_files=[args.int8, args.eval_data])
    data = int8_data(model, args)
    result = export_int8(model, output, data.calibration, target="litert", eval_data=data.evaluation,
                         labels=data.labels, options=int8_options(args))
    return finish_int8(args, result, seconds, what="LiteRT")


def _work(args) -> int:
    if args.int8:
        return _work_int8(args)
    output = Path(args.output) if args.output else Path(args.model).with_suffix(".tflite")
    preflight(args, output, data_files=[args.inputs])  # before TensorFlow is imported
    from keras_bn_ext.export.driver import export_verified
    from keras_bn_ext.export.options import ExportOptions

    seconds: dict[str, float] = {}
    with timed(seconds, "load"):
        model = load_input_model(args, output, data_files=[args.inputs])
    inputs = verification_inputs(model, args)
    result = export_verified(model, output, target="litert", options=ExportOptions(
        fold=not args.no_fold, exclude=args.exclude, fp16=args.fp16, samples=args.samples, inputs=inputs,
        atol=args.atol, rtol=args.rtol, benchmark=args.benchmark))
    result.timings_s = {**seconds, **result.timings_s}
    if args.json:
        print(json.dumps({"input": str(args.model), **result.to_dict(),
                          "samples": "npz" if inputs is not None else args.samples}, indent=2))
    else:
        print_export(result, what="LiteRT")
    return EXIT_OK if result.passed else EXIT_VERIFY_FAILED


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.eval_data and not args.int8:
        parser.error("--eval needs --int8")
    for flag, value in (("--no-fold", args.no_fold), ("--fp16", args.fp16), ("--inputs", args.inputs)):
        if args.int8 and value:
            parser.error(f"--int8 cannot be combined with {flag}")
    return run(PROG, lambda: _work(args), debug=args.debug, show_progress=not args.json,
               json_errors=args.json)


if __name__ == "__main__":
    sys.exit(main())
