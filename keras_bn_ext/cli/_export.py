"""What every export CLI runs: the float export or the INT8 one, of the target it names, read
from the shared flags; each CLI brings its target object (with its own options), its file
suffixes and, if it has more to say, its own table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from keras_bn_ext.cli._inputs import int8_data, int8_options, load_input_model, preflight, verification_inputs
from keras_bn_ext.cli._output import finish_int8, print_export
from keras_bn_ext.cli._run import EXIT_OK, EXIT_VERIFY_FAILED, timed


def run_export_cli(prog: str, parser, argv, work: Callable, usage_error: Callable) -> int:
    """A bn-export-* main(): parse, refuse bad combinations in one line (`usage_error(args)`:
    a message or None), then `work(args)` under the tools' error handling (`_run.run`)."""
    from keras_bn_ext.cli._run import run

    args = parser.parse_args(argv)
    problem = usage_error(args)
    if problem:
        parser.error(problem)
    return run(prog, lambda: work(args), debug=args.debug, show_progress=not args.json, json_errors=args.json)


def int8_usage_error(args, *, float_only: tuple[str, ...] = ()) -> str | None:
    """The combinations the INT8 export refuses: the float-only flags with --int8 or --eval
    (--eval alone is a QAT model's INT8 export; a float model then needs --int8, said after
    it is loaded)."""
    if not args.int8 and not args.eval_data:
        return None
    for flag in ("--no-fold", "--fp16", "--inputs", *float_only):
        if getattr(args, flag.lstrip("-").replace("-", "_")):
            return f"--int8 cannot be combined with {flag}"
    return None


def export_float(args, *, target: Callable[[], object], suffix: str, what: str,
                 batch_size: int | None = None, printer: Callable | None = None) -> int:
    """bn-export-*: fold, convert, verify, commit (`export.driver.export_verified`), then the
    JSON report or the table (`printer(result)`, default `print_export`)."""
    output = Path(args.output) if args.output else Path(args.model).with_suffix(suffix)
    preflight(args, output, data_files=[args.inputs])  # before TensorFlow is imported
    from keras_bn_ext.errors import InputDataError
    from keras_bn_ext.export.driver import export_verified
    from keras_bn_ext.export.options import ExportOptions
    from keras_bn_ext.qat.model import is_qat_model

    seconds: dict[str, float] = {}
    with timed(seconds, "load"):
        model = load_input_model(args, output, data_files=[args.inputs])
    if is_qat_model(model):
        raise InputDataError(f"{args.model} is a quantization-aware model: its INT8 file is written from its "
                             "learned ranges and judged against its own simulation on real data; give "
                             "--eval EVAL.npz (labels beside the inputs give accuracy)")
    inputs = verification_inputs(model, args)
    if inputs is not None and batch_size and inputs[0].shape[0] != batch_size:
        raise InputDataError(f"--batch-size {batch_size} but {args.inputs} holds batches of {inputs[0].shape[0]}")
    result = export_verified(model, output, target=target(), options=ExportOptions(
        fold=not args.no_fold, exclude=args.exclude, fp16=args.fp16, samples=args.samples, inputs=inputs,
        atol=args.atol, rtol=args.rtol, benchmark=args.benchmark, batch_size=batch_size))
    result.timings_s = {**seconds, **result.timings_s}
    if args.json:
        print(json.dumps({"input": str(args.model), **result.to_dict(),
                          "samples": "npz" if inputs is not None else args.samples}, indent=2))
    elif printer is not None:
        printer(result)
    else:
        print_export(result, what=what)
    return EXIT_OK if result.passed else EXIT_VERIFY_FAILED


def export_int8_file(args, *, target: Callable[[], object], suffix: str, what: str,
                     lines: Callable | None = None) -> int:
    """bn-export-* --int8 CALIB (or a QAT model with --eval alone): the shared INT8 driver
    (`export.int8.export_int8`) on the target."""
    output = Path(args.output) if args.output else Path(args.model).with_suffix(suffix)
    preflight(args, output, data_files=[args.int8, args.eval_data])  # before TensorFlow is imported
    from keras_bn_ext.errors import InputDataError
    from keras_bn_ext.export.int8 import export_int8
    from keras_bn_ext.qat.model import is_qat_model

    seconds: dict[str, float] = {}
    with timed(seconds, "load"):
        model = load_input_model(args, output, data_files=[args.int8, args.eval_data])
    learned = is_qat_model(model)
    if learned and args.int8:
        raise InputDataError(f"{args.model} is a quantization-aware model: it brings its own ranges, so --int8 "
                             f"{args.int8} would calibrate nothing; give --eval EVAL.npz alone")
    if not learned and not args.int8:
        raise InputDataError(f"--eval without --int8 is a quantization-aware model's export; {args.model} is a "
                             "float model: give --int8 CALIB.npz")
    data = int8_data(model, args)
    result = export_int8(model, output, data.calibration, target=target(), eval_data=data.evaluation,
                         labels=data.labels, options=int8_options(args))
    return finish_int8(args, result, seconds, what=what, lines=lines)
