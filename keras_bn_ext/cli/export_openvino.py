"""bn-export-openvino: export a .keras model to OpenVINO IR (folded first) and verify it on
OpenVINO's CPU runtime. A thin shell over `export.driver.export_verified(target="openvino")`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from keras_bn_ext.cli._args import (EXIT_CODES_HELP, Parser, add_common_arguments, add_data_key_argument,
                                    add_int8_arguments, add_qdq_arguments)
from keras_bn_ext.cli._inputs import int8_data, int8_options, qdq_options, load_input_model, preflight, verification_inputs
from keras_bn_ext.cli._output import finish_int8, print_export
from keras_bn_ext.cli._run import EXIT_OK, EXIT_VERIFY_FAILED, run, timed
from keras_bn_ext.export import options

PROG = "bn-export-openvino"


def build_parser() -> Parser:
    parser = Parser(
        prog=PROG,
        description="Export a .keras (or legacy .h5) model to OpenVINO IR (OUT.xml and OUT.bin, written together) "
        "with openvino.convert_model (BatchNormalization folded first; inputs and outputs named as Keras names "
        "them, dynamic batch), and verify it against the Keras model on OpenVINO's CPU runtime in float32.",
        epilog=EXIT_CODES_HELP + " Needs the openvino extra (pip install '.[openvino]' from a clone).",
    )
    sizes = " and ".join(map(str, options.BATCH_SIZES))
    add_common_arguments(
        parser, atol=None, rtol=None,
        samples_help=f"seeded random batches of each batch size ({sizes}) to verify on (default: {options.SAMPLES})",
        tolerance_help=f". Defaults: atol {options.FP32_ATOL:g} and rtol {options.FP32_RTOL:g}; with --fp16 atol "
                       f"{options.FP16_ATOL:g} and rtol {options.FP16_RTOL:g}")
    parser.add_argument("-o", "--output", help="output .xml file (default: MODEL.xml beside the input; the weights "
                                               "go to the .bin of the same name)")
    parser.add_argument("--no-fold", action="store_true", help="export without folding BatchNormalization")
    parser.add_argument("--inputs", metavar="NPZ",
                        help="verify on these arrays (an .npz keyed by input name) instead of random batches")
    add_data_key_argument(parser, flags="--inputs, --int8 and --eval")
    parser.add_argument("--fp16", action="store_true",
                        help="float16 weights (openvino.save_model's compression), verified with float16 tolerances")
    parser.add_argument("--benchmark", action="store_true", help="also report OpenVINO's median latency")
    group = add_int8_arguments(
        parser, title="INT8 (the ONNX target's calibrated QDQ graph, compiled by OpenVINO; judged on OpenVINO's "
                      "runtime against the float Keras model; float and INT8 timed there side by side)",
        output="MODEL.int8.xml",
        equalize_help="cross-layer equalization, as bn-export-onnx --equalize (default: auto)")
    add_qdq_arguments(group)
    return parser


def _work_int8(args) -> int:
    output = Path(args.output) if args.output else Path(args.model).with_suffix(".int8.xml")
    preflight(args, output, data_files=[args.int8, args.eval_data])  # before TensorFlow is imported
    from keras_bn_ext.cli.export_onnx import qdq_lines
    from keras_bn_ext.export.int8 import export_int8
    from keras_bn_ext.export.openvino.target import OpenVINOTarget

    seconds: dict[str, float] = {}
    with timed(seconds, "load"):
        model = load_input_model(args, output, data_files=[args.int8, args.eval_data])
    data = int8_data(model, args)
    result = export_int8(model, output, data.calibration, target=OpenVINOTarget(int8=qdq_options(args)),
                         eval_data=data.evaluation, labels=data.labels, options=int8_options(args))
    return finish_int8(args, result, seconds, what="OpenVINO",
                       lines=lambda console, r: qdq_lines(console, r.detail.qdq))


def _work(args) -> int:
    if args.int8:
        return _work_int8(args)
    output = Path(args.output) if args.output else Path(args.model).with_suffix(".xml")
    preflight(args, output, data_files=[args.inputs])  # before TensorFlow is imported
    from keras_bn_ext.export.driver import export_verified
    from keras_bn_ext.export.options import ExportOptions

    seconds: dict[str, float] = {}
    with timed(seconds, "load"):
        model = load_input_model(args, output, data_files=[args.inputs])
    inputs = verification_inputs(model, args)
    result = export_verified(model, output, target="openvino", options=ExportOptions(
        fold=not args.no_fold, exclude=args.exclude, fp16=args.fp16, samples=args.samples, inputs=inputs,
        atol=args.atol, rtol=args.rtol, benchmark=args.benchmark))
    result.timings_s = {**seconds, **result.timings_s}
    if args.json:
        print(json.dumps({"input": str(args.model), **result.to_dict(),
                          "samples": "npz" if inputs is not None else args.samples}, indent=2))
    else:
        print_export(result, what="OpenVINO")
    return EXIT_OK if result.passed else EXIT_VERIFY_FAILED


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    parser = build_parser()
    if Path(args.output or "x.xml").suffix != ".xml":
        parser.error(f"the output must be an .xml file (OpenVINO IR). Received: --output {args.output}")
    if args.eval_data and not args.int8:
        parser.error("--eval needs --int8")
    for flag, value in (("--no-fold", args.no_fold), ("--fp16", args.fp16), ("--inputs", args.inputs)):
        if args.int8 and value:
            parser.error(f"--int8 cannot be combined with {flag}")
    return run(PROG, lambda: _work(args), debug=args.debug, show_progress=not args.json, json_errors=args.json)


if __name__ == "__main__":
    sys.exit(main())
