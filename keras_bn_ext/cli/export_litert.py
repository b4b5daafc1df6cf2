"""bn-export-litert: export a .keras model to LiteRT (TFLite), folded first, and verify it on
ai-edge-litert's interpreter."""

from __future__ import annotations

import argparse
import sys

from keras_bn_ext.cli._export import export_float, export_int8_file, int8_usage_error, run_export_cli
from keras_bn_ext.cli._args import EXIT_CODES_HELP, Parser, add_export_arguments, add_int8_arguments

PROG = "bn-export-litert"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG,
        description="Export a .keras (or legacy .h5) model to LiteRT (.tflite) with TensorFlow's LiteRT converter "
        "(BatchNormalization folded first; signature 'serving_default' with the Keras input and output names, "
        "dynamic batch), and verify it against the Keras model on ai-edge-litert's interpreter.",
        epilog=EXIT_CODES_HELP,
    )
    add_export_arguments(parser, output_help="output .tflite file (default: MODEL.tflite beside the input)",
                         batches=", resized on the interpreter",
                         fp16_help="float16 weights (the converter's float16 quantization)",
                         benchmark_help="also report the interpreter's median latency")
    add_int8_arguments(
        parser, title="INT8 (full-integer LiteRT, float32 inputs and outputs; calibrated and judged on real data "
                      "against the float Keras model as the ONNX INT8 file is)",
        output="MODEL.int8.tflite",
        equalize_help="cross-layer equalization (an exact transform, verified): auto = tried when the plain file "
                      "misses a criterion, the better kept (default)")
    return parser


def _target():
    from keras_bn_ext.export.litert.target import LITERT

    return LITERT


def _work(args) -> int:
    if args.int8 or args.eval_data:  # --eval alone: a QAT model (refused where the target cannot)
        return export_int8_file(args, target=_target, suffix=".int8.tflite", what="LiteRT")
    return export_float(args, target=_target, suffix=".tflite", what="LiteRT")


def main(argv: list[str] | None = None) -> int:
    return run_export_cli(PROG, build_parser(), argv, _work, int8_usage_error)


if __name__ == "__main__":
    sys.exit(main())
