"""What the tools read, in the order they read it: arguments and paths first (no TensorFlow
yet: a wrong path is an error in well under a second), then the model, then its data.

Every flag that reads an .npz (`--inputs`, `--int8`, `--eval`, `--data`, `--recalibrate`)
follows one convention, `data.npz_data`: arrays keyed by the InputLayer's name, or the one
`--data-key` names; a one-input model also takes a file with one array, or Keras's
`mnist.npz` layout (x_train for calibration and recalibration, x_test for evaluation and
verification)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


def preflight(args, output: Path, *, data_files: Sequence[str | None] = ()) -> None:
    """The checks that need no Keras: the model file, each data file, the output path (never
    an input, never an existing file without --force, its folder there)."""
    from keras_bn_ext.files import check_model_file, check_npz_file, check_output_path

    check_model_file(args.model)
    files = [f for f in data_files if f]
    for file in files:
        check_npz_file(file)
    check_output_path(output, inputs=[args.model, *files], force=args.force)


def load_input_model(args, output: Path, *, data_files: Sequence[str | None] = ()):
    """`preflight`, then the user's custom modules, then the model itself."""
    preflight(args, output, data_files=data_files)
    from keras_bn_ext.model_io import import_custom_modules, load_model
    from keras_bn_ext.progress import phase

    with phase("load"):
        import_custom_modules(args.custom_module)
        return load_model(args.model, safe_mode=not args.unsafe)


def npz_arrays(model, path: str, args, *, flag: str, split: str):
    """`data.NpzData` of `path` for `model` (errors name the flag and the file)."""
    from keras_bn_ext.data import npz_data

    return npz_data(model, path, key=getattr(args, "data_key", None), split=split, flag=flag)


@dataclass
class Int8Data:
    """--int8 and --eval, read for the model: calibration arrays, evaluation arrays (None:
    held out of the calibration), and the labels of whichever is evaluated on."""

    calibration: list
    evaluation: list | None
    labels: object | None


def int8_data(model, args) -> Int8Data:
    """--int8's calibration and --eval's evaluation data (a QAT model: --eval alone, no calibration)."""
    calibration = npz_arrays(model, args.int8, args, flag="--int8", split="train") if args.int8 else None
    evaluation = npz_arrays(model, args.eval_data, args, flag="--eval", split="test") if args.eval_data else None
    labels = (evaluation if evaluation is not None else calibration).labels
    return Int8Data(calibration.arrays if calibration is not None else None,
                    evaluation.arrays if evaluation is not None else None, labels)


def int8_options(args):
    """The driver's `Int8Options` from the INT8 flags every tool shares (--fallback-budget where
    the tool has it)."""
    from keras_bn_ext.export.int8 import Int8Options
    from keras_bn_ext.quantization import options as q
    from keras_bn_ext.quantization.fidelity import Criteria

    criteria = Criteria(min_top1_agreement=args.min_top1_agreement, max_accuracy_drop=args.max_accuracy_drop,
                        min_sqnr_db=args.min_sqnr_db)
    return Int8Options(exclude=tuple(args.exclude), equalize=args.equalize, relu6_to_relu=args.relu6_to_relu,
                       criteria=criteria, calibration_batch_size=args.calibration_batch_size,
                       fallback_budget=getattr(args, "fallback_budget", q.FALLBACK_BUDGET),
                       latency=getattr(args, "latency_first", False))


def qdq_options(args):
    """The ONNX QDQ graph's `OnnxInt8Options` from its flags (`_args.add_qdq_arguments`)."""
    from keras_bn_ext.export.onnx.options import OnnxInt8Options

    return OnnxInt8Options(per_channel=not args.per_tensor, method=args.calibration_method,
                           target_cpu=args.target_cpu, preprocess=not args.no_preprocess,
                           batch_size=getattr(args, "batch_size", None), weight_bits=args.weight_bits)


def recalibration_data(model, args, *, flag: str = "--data") -> list:
    """The arrays of the --data (bn-fold: --recalibrate) file for `model`'s inputs, checked."""
    return npz_arrays(model, args.data, args, flag=flag, split="train").arrays


def verification_inputs(model, args):
    """--inputs for the float verification (None: seeded random batches)."""
    return npz_arrays(model, args.inputs, args, flag="--inputs", split="test").arrays if args.inputs else None
