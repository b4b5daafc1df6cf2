"""The command-line tools' arguments: one parser class (errors in one line), the flags the
tools share, and their value types. Imports nothing heavy: `--help` and a usage error
answer at once."""

from __future__ import annotations

import argparse
import sys


EXIT_CODES_HELP = ("exit codes: 0 done and verified, 1 verification failed, 2 bad input or usage, 130/143 "
                   "interrupted/terminated (temporary files removed). Runs on Keras's TensorFlow backend whatever "
                   "KERAS_BACKEND or ~/.keras/keras.json say (a .keras file is backend-independent).")


class Parser(argparse.ArgumentParser):
    """argparse with a usage error in one line (`PROG: error: MESSAGE (see PROG --help)`, exit
    2) instead of the whole usage block; with --json among the arguments the same error is
    also printed on stdout as the tools' JSON error object (code "usage")."""

    def error(self, message):
        from keras_bn_ext.cli._run import EXIT_USAGE, print_json_error

        if getattr(self, "_json_argv", False):
            print_json_error("usage", message, None)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        self._json_argv = "--json" in (sys.argv[1:] if args is None else args)
        return super().parse_args(args, namespace)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text}")
    return value


def add_common_arguments(
    parser: argparse.ArgumentParser,
    *,
    atol: float | None,
    rtol: float | None,
    samples_help: str,
    tolerance_help: str = "",
) -> None:
    """The flags the verifying tools share. atol/rtol None: the tool picks defaults after parsing
    (described by tolerance_help)."""
    add_model_arguments(parser)
    parser.add_argument("--samples", type=positive_int, default=3,
                        help=samples_help)
    parser.add_argument("--atol", type=non_negative_float, default=atol,
                        help="absolute tolerance" + (f" (default: {atol:g})" if atol is not None else ""))
    parser.add_argument("--rtol", type=non_negative_float, default=rtol,
                        help="tolerance relative to max|reference|"
                             + (f" (default: {rtol:g})" if rtol is not None else "")
                             + "; an output passes when max|a-b| <= atol + rtol * max|reference|"
                             + tolerance_help)
    parser.add_argument("--exclude", action="append", default=[], metavar="NAME",
                        help="keep the BatchNormalization layer NAME unfolded; repeatable")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of every tool that reads one model file and writes one output."""
    parser.add_argument("model", help="the .keras model file, or a legacy Keras .h5/.hdf5 one (never modified)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--custom-module", action="append", default=[], metavar="MOD",
                        help="import MOD (a module name or a .py file) first, to register "
                             "custom layers; repeatable")
    parser.add_argument("--unsafe", action="store_true",
                        help="load with safe_mode=False (allows Lambda layers: runs code "
                             "stored in the file; only for files you trust)")
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks and TensorFlow's own log lines")


def add_export_arguments(parser: argparse.ArgumentParser, *, output_help: str, batches: str, fp16_help: str,
                         benchmark_help: str) -> None:
    """The flags every bn-export-* tool shares: the common ones, -o, --no-fold, --inputs, --data-key,
    --fp16, --benchmark (the tolerances default to float32's, float16's with --fp16)."""
    from keras_bn_ext.export import options

    sizes = " and ".join(map(str, options.BATCH_SIZES))
    add_common_arguments(
        parser, atol=None, rtol=None,
        samples_help=f"seeded random batches of each batch size ({sizes}{batches}) to verify on "
                     f"(default: {options.SAMPLES})",
        tolerance_help=f". Defaults: atol {options.FP32_ATOL:g} and rtol {options.FP32_RTOL:g}; with --fp16 atol "
                       f"{options.FP16_ATOL:g} and rtol {options.FP16_RTOL:g}")
    parser.add_argument("-o", "--output", help=output_help)
    parser.add_argument("--no-fold", action="store_true", help="export without folding BatchNormalization")
    parser.add_argument("--inputs", metavar="NPZ",
                        help="verify on these arrays (an .npz keyed by input name) instead of random batches")
    add_data_key_argument(parser, flags="--inputs, --int8 and --eval")
    parser.add_argument("--fp16", action="store_true", help=fp16_help + ", verified with float16 tolerances")
    parser.add_argument("--benchmark", action="store_true", help=benchmark_help)


def add_data_key_argument(parser: argparse.ArgumentParser, *, flags: str) -> None:
    """--data-key: which array of every data file the tool reads (`flags`) a one-input model
    takes, for a file keyed otherwise (`data.npz_data` says the rest of the convention)."""
    parser.add_argument("--data-key", metavar="KEY",
                        help=f"for a one-input model: the array of {flags} to use. Default: the array named after "
                             "the model's InputLayer; else the file's only array (besides 'labels'), or x_train / "
                             "x_test in Keras's mnist.npz layout")


def add_recalibration_arguments(parser: argparse.ArgumentParser, *, flag: str, data_help: str,
                                prefix: str = "") -> None:
    """The flags of recalibration: bn-recalibrate --data ..., and bn-fold --recalibrate
    with the same options under `prefix` (--recalibrate-mode, ...)."""
    from keras_bn_ext.recalibration.options import BATCH_SIZE, MODES

    group = parser.add_argument_group("recalibration of BN statistics")
    group.add_argument(flag, metavar="DATA.npz", dest="data", required=flag == "--data", help=data_help)
    group.add_argument(f"--{prefix}data-key", dest="data_key", metavar="KEY",
                        help="for a one-input model: the array of DATA.npz to use (default: the one named "
                             "after the model's input)")
    group.add_argument(f"--{prefix}mode", dest="mode", choices=MODES, default="exact",
                        help="exact (default): each BN's statistics are those of its own inputs over all "
                             "the data, in inference, BNs before it already recalibrated (one pass per "
                             "level of BNs); running: one pass, each BN normalizes each batch with its own "
                             "statistics and keeps their average (PyTorch's update_bn)")
    group.add_argument(f"--{prefix}batch-size", dest="batch_size", type=positive_int, default=BATCH_SIZE,
                        help=f"samples per forward pass (default: {BATCH_SIZE})")
    group.add_argument(f"--{prefix}keep-frozen", dest="keep_frozen", action="store_true",
                        help="leave BNs with trainable=False as they are (default: recalibrate them too)")


def add_int8_arguments(parser: argparse.ArgumentParser, *, title: str, output: str, equalize_help: str):
    """The INT8 flags every target shares (data, equalization, pass criteria); returns the
    group for the target's own."""
    from keras_bn_ext.quantization import options as q

    group = parser.add_argument_group(title)
    group.add_argument("--int8", metavar="CALIB.npz",
                       help=f"write an INT8 model (default {output}) calibrated on these real samples "
                            "(arrays keyed by input name, samples on axis 0, as --inputs)")
    group.add_argument("--eval", metavar="EVAL.npz", dest="eval_data",
                       help="held-out real samples to measure the INT8 model on (keyed by input name; an "
                            "optional 'labels' array of integer class ids adds accuracy). Default: the last "
                            f"{q.HOLDOUT_FRACTION:.0%}% of CALIB.npz, held out of the calibration (and its "
                            "'labels', if any). Alone, for a quantization-aware model (bn-qat): its INT8 file "
                            "written from the learned ranges, judged against the model's own simulation")
    group.add_argument("--calibration-batch-size", type=positive_int, default=q.CALIBRATION_BATCH_SIZE,
                       metavar="N", help=f"samples per calibration batch (default: {q.CALIBRATION_BATCH_SIZE})")
    group.add_argument("--equalize", choices=q.EQUALIZE_CHOICES, default="auto", help=equalize_help)
    group.add_argument("--relu6-to-relu", action="store_true",
                       help="let equalization replace ReLU6 by ReLU (CHANGES the function: ReLU6 is not "
                            "positively homogeneous, so those pairs are otherwise left alone)")
    group.add_argument("--min-top1-agreement", type=float, default=q.MIN_TOP1_AGREEMENT, metavar="F",
                       help="a classifier output must agree with the float model's top-1 class on this share "
                            f"of the samples (default: {q.MIN_TOP1_AGREEMENT})")
    group.add_argument("--max-accuracy-drop", type=non_negative_float, default=q.MAX_ACCURACY_DROP, metavar="PT",
                       help=f"with labels: at most this many points of accuracy lost (default: {q.MAX_ACCURACY_DROP})")
    group.add_argument("--min-sqnr-db", type=float, default=q.MIN_SQNR_DB, metavar="DB",
                       help=f"other outputs: at least this SQNR (default: {q.MIN_SQNR_DB:g} dB)")
    return group


def add_qdq_arguments(group) -> None:
    """The flags of a QDQ graph's INT8 (bn-export-onnx --int8, and bn-export-openvino --int8,
    which compiles that graph)."""
    from keras_bn_ext.export.onnx import cpu
    from keras_bn_ext.export.onnx import options as onnx_options
    from keras_bn_ext.quantization import options as q

    group.add_argument("--per-tensor", action="store_true",
                       help="one weight scale per tensor (default: per output channel)")
    group.add_argument("--weight-bits", type=int, choices=(8, 4), default=8,
                       help="4: int4 weights (opset 21), each clipped to the range that minimizes its rounding "
                            "error first; onnxruntime runs them as float convolutions (default: 8)")
    group.add_argument("--calibration-method", choices=onnx_options.METHODS, default=onnx_options.DEFAULT_METHOD,
                       help=f"how activation ranges are chosen (default: {onnx_options.DEFAULT_METHOD})")
    group.add_argument("--target-cpu", choices=cpu.TARGETS, default="auto",
                       help="the CPU the file will run on: auto = this one. Without VNNI (avx2, avx512) "
                            "weights get 7 bits (reduce_range) so onnxruntime's int16 sums cannot saturate; "
                            "vnni and arm64 keep 8 bits")
    group.add_argument("--fallback-budget", type=non_negative_int, default=q.FALLBACK_BUDGET, metavar="N",
                       help="when a criterion is missed, keep up to N quantized segments (a conv and its "
                            "fused activation) in float, worst first "
                            f"(default: {q.FALLBACK_BUDGET}; 0: no fallback)")
    group.add_argument("--no-preprocess", action="store_true",
                       help="quantize the exported graph as it is, without onnxruntime's pre-quantization step "
                            "(quant_pre_process: a zero Pad moved into its Conv, so it does not run in float "
                            "between INT8 ops; checked against the exported graph)")
