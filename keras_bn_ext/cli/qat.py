"""bn-qat: quantization-aware training of a trained classifier, saved and checked."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from keras_bn_ext.cli._args import EXIT_CODES_HELP, Parser, add_data_key_argument, add_model_arguments, positive_int
from keras_bn_ext.cli._inputs import load_input_model, npz_arrays, preflight
from keras_bn_ext.cli._output import fmt, verdict
from keras_bn_ext.cli._run import EXIT_OK, EXIT_VERIFY_FAILED, run, timed
from keras_bn_ext.qat.options import TARGETS

PROG = "bn-qat"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG,
        description="Make a trained .keras classifier quantization-aware (each conv/dense layer and the "
        "BatchNormalization after it fused, trained with folded fake-quantized weights; activations "
        "fake-quantized where the INT8 file quantizes them; ranges calibrated on the first training "
        "samples), train it with model.fit, save it, load the saved file back and check it. Then "
        "`bn-export-onnx OUT.qat.keras --eval EVAL.npz` (or bn-export-litert, bn-export-openvino) writes its "
        "INT8 file from the learned ranges.",
        epilog=EXIT_CODES_HELP,
    )
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, metavar="NPZ",
                        help="training inputs (named after the model's input) and integer class ids ('labels', "
                             "or y_train in Keras's mnist.npz layout)")
    parser.add_argument("--eval", dest="eval_data", metavar="NPZ",
                        help="held-out inputs and labels: the accuracy of the float model and of the QAT model "
                             "before and after training")
    add_data_key_argument(parser, flags="--data and --eval")
    parser.add_argument("--epochs", type=positive_int, default=1, help="passes over --data (default: 1)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="training batch size (default: 64)")
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="Adam's learning rate (default: 1e-4)")
    parser.add_argument("--weight-bits", type=int, choices=(8, 4), default=8, help="weight bits (default: 8)")
    parser.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor (default: per channel)")
    parser.add_argument("--target", choices=TARGETS, default="onnx",
                        help="the runtime whose INT8 graph is simulated: onnx (also compiled by bn-export-openvino) "
                             "or litert (8-bit weights only) (default: onnx)")
    parser.add_argument("--calibration-samples", type=positive_int, default=512,
                        help="training samples the activation ranges start from (default: 512)")
    parser.add_argument("--bn-freeze-after", type=int, metavar="STEPS",
                        help="freeze the fused BN statistics after this many steps (default: never)")
    parser.add_argument("-o", "--output", help="output .keras file (default: MODEL.qat.keras beside the input)")
    return parser


def default_output(model_path: str) -> Path:
    path = Path(model_path)
    return path.with_name(f"{path.stem}.qat.keras")


def _labelled(model, path, args, *, flag: str, split: str):
    """(inputs, labels) of `path` for a one-input classifier, checked."""
    from keras_bn_ext.compare import keras_outputs
    from keras_bn_ext.errors import InputDataError
    from keras_bn_ext.quantization.fidelity import check_labels, is_classifier_output

    data = npz_arrays(model, path, args, flag=flag, split=split)
    if data.labels is None:
        raise InputDataError(f"{flag} {path} holds no labels: add an integer array 'labels' (np.savez(..., "
                             "labels=y)), or y_train / y_test in Keras's mnist.npz layout")
    (out,) = keras_outputs(model, [a[:2] for a in data.arrays])
    classes = int(out.shape[1]) if is_classifier_output(out) else None
    return data.arrays[0], check_labels(data.labels, len(data.arrays[0]), classes, source=f"{flag} {path}: labels")


def _work(args) -> int:
    output = Path(args.output) if args.output else default_output(args.model)
    preflight(args, output, data_files=[args.data, args.eval_data])  # before TensorFlow is imported
    from keras_bn_ext.errors import UnsupportedModelError
    from keras_bn_ext.qat.train import train_qat_to_file

    seconds: dict[str, float] = {}
    with timed(seconds, "load"):
        model = load_input_model(args, output, data_files=[args.data, args.eval_data])
        if len(model.inputs) != 1 or len(model.outputs) != 1:
            raise UnsupportedModelError(f"bn-qat trains single-input, single-output classifiers; {args.model} has "
                                        f"{len(model.inputs)} inputs and {len(model.outputs)} outputs (use "
                                        "keras_bn_ext.qat.quantize_model and fit)")
        train = _labelled(model, args.data, args, flag="--data", split="train")
        evaluation = _labelled(model, args.eval_data, args, flag="--eval", split="test") if args.eval_data else None
    with timed(seconds, "train_save_verify"):
        result = train_qat_to_file(model, train, output, options=args.options, eval_data=evaluation,
                                   safe_mode=not args.unsafe)
    report = {"input": str(args.model), "data": str(args.data), "eval_file": args.eval_data, **result.to_dict(),
              "timings_s": seconds}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_summary(result)
    return EXIT_OK if result.passed else EXIT_VERIFY_FAILED


def _print_summary(result) -> None:
    from rich.console import Console

    console = Console()
    t, o = result.training, result.options
    console.print(f"trained {t.epochs} epoch(s), {t.steps} steps on {t.samples:,} samples in {t.seconds:.1f} s "
                  f"({t.loss}{', from logits' if t.from_logits else ''}); weights {o.weight_bits}-bit "
                  f"{'per channel' if o.per_channel else 'per tensor'}, activations uint8")
    if t.history:
        console.print("loss per epoch: " + ", ".join(f"{v:.4f}" for v in t.history))
    if t.accuracy_float is not None:
        console.print(f"accuracy: float {t.accuracy_float:.4f}, QAT untrained {t.accuracy_qat_untrained:.4f}, "
                      f"QAT trained {t.accuracy_qat:.4f} (simulated; the INT8 file is judged against it)")
    if result.reload_error:
        console.print(f"[red]{result.reload_error}; nothing written[/red]")
        return
    check = result.file_check
    console.print(f"the saved file, reloaded: outputs vs the trained model max rel err {fmt(check.max_rel_err)}: "
                  f"{verdict(check.passed)}")
    console.print(f"wrote {result.output}" if result.output else "[red]check failed; nothing written[/red]")


def main(argv: list[str] | None = None) -> int:
    from keras_bn_ext.qat.options import QatOptions

    parser = build_parser()
    args = parser.parse_args(argv)
    try:  # checked before TensorFlow is imported, as a usage error
        args.options = QatOptions(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
                                  weight_bits=args.weight_bits, per_channel=not args.per_tensor, target=args.target,
                                  calibration_samples=args.calibration_samples, bn_freeze_after=args.bn_freeze_after)
    except ValueError as exc:
        parser.error(str(exc))
    return run(PROG, lambda: _work(args), debug=args.debug, show_progress=not args.json, json_errors=args.json)


if __name__ == "__main__":
    sys.exit(main())
