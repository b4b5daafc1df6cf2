"""bn-export-openvino: export a .keras model to OpenVINO IR (folded first) and verify it on
OpenVINO's CPU runtime. A thin shell over `export.driver.export_verified(target="openvino")`."""

from __future__ import annotations

import sys
from pathlib import Path

from keras_bn_ext.cli._export import export_float, export_int8_file, int8_usage_error, run_export_cli
from keras_bn_ext.cli._inputs import qdq_options
from keras_bn_ext.cli._args import (EXIT_CODES_HELP, Parser, add_export_arguments, add_int8_arguments,
                                    add_qdq_arguments)

PROG = "bn-export-openvino"


def build_parser() -> Parser:
    parser = Parser(
        prog=PROG,
        description="Export a .keras (or legacy .h5) model to OpenVINO IR (OUT.xml and OUT.bin, written together) "
        "with openvino.convert_model (BatchNormalization folded first; inputs and outputs named as Keras names "
        "them, dynamic batch), and verify it against the Keras model on OpenVINO's CPU runtime in float32.",
        epilog=EXIT_CODES_HELP + " Needs the openvino extra (pip install '.[openvino]' from a clone).",
    )
    add_export_arguments(parser, output_help="output .xml file (default: MODEL.xml beside the input; the weights go "
                                             "to the .bin of the same name)",
                         batches="", fp16_help="float16 weights (openvino.save_model's compression)",
                         benchmark_help="also report OpenVINO's median latency")
    group = add_int8_arguments(
        parser, title="INT8 (the ONNX target's calibrated QDQ graph, compiled by OpenVINO; judged on OpenVINO's "
                      "runtime against the float Keras model; float and INT8 timed there side by side)",
        output="MODEL.int8.xml",
        equalize_help="cross-layer equalization, as bn-export-onnx --equalize (default: auto)")
    add_qdq_arguments(group)
    return parser


def _work(args) -> int:
    from keras_bn_ext.export.openvino.target import OPENVINO, OpenVINOTarget

    if args.int8 or args.eval_data:  # --eval alone: a QAT model (refused where the target cannot)
        from keras_bn_ext.cli.export_onnx import qdq_lines

        return export_int8_file(args, target=lambda: OpenVINOTarget(int8=qdq_options(args)), suffix=".int8.xml",
                                what="OpenVINO", lines=lambda console, r: qdq_lines(console, r.detail.qdq))
    return export_float(args, target=lambda: OPENVINO, suffix=".xml", what="OpenVINO")


def _usage_error(args) -> str | None:
    if Path(args.output or "x.xml").suffix != ".xml":
        return f"the output must be an .xml file (OpenVINO IR). Received: --output {args.output}"
    return int8_usage_error(args)


def main(argv: list[str] | None = None) -> int:
    return run_export_cli(PROG, build_parser(), argv, _work, _usage_error)


if __name__ == "__main__":
    sys.exit(main())
