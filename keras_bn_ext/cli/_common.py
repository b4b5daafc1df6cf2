"""What the command-line tools share: common flags, error handling, exit codes."""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from contextlib import contextmanager
from typing import Callable, Sequence

from keras_bn_ext.cli._native_log import captured_native_stderr
from keras_bn_ext.errors import KerasBnExtError

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1
EXIT_USAGE = 2

EXIT_CODES_HELP = "exit codes: 0 done and verified, 1 verification failed, 2 bad input or usage"


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
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
    """The flags both tools share. atol/rtol None: the tool picks defaults after parsing
    (described by tolerance_help)."""
    parser.add_argument("model", help="the .keras model file, or a legacy Keras .h5/.hdf5 one (never modified)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--samples", type=positive_int, default=3,
                        help=samples_help)
    parser.add_argument("--atol", type=non_negative_float, default=atol,
                        help="absolute tolerance" + (f" (default: {atol:g})" if atol is not None else ""))
    parser.add_argument("--rtol", type=non_negative_float, default=rtol,
                        help="tolerance relative to max|reference|"
                             + (f" (default: {rtol:g})" if rtol is not None else "")
                             + "; an output passes when max|a-b| <= atol + rtol * max|reference|"
                             + tolerance_help)
    parser.add_argument("--custom-module", action="append", default=[], metavar="MOD",
                        help="import MOD (a module name or a .py file) first, to register "
                             "custom layers; repeatable")
    parser.add_argument("--unsafe", action="store_true",
                        help="load with safe_mode=False (allows Lambda layers: runs code "
                             "stored in the file; only for files you trust)")
    parser.add_argument("--exclude", action="append", default=[], metavar="NAME",
                        help="keep the BatchNormalization layer NAME unfolded; repeatable")
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks and TensorFlow's own log lines")


def load_input_model(args, output, *, other_inputs: Sequence[str] = ()):
    """The steps both tools take before any work, in this order: the input file's own
    errors, the output path (never an input, never an existing file without --force),
    the user's custom modules, then the model itself."""
    from keras_bn_ext.model_io import check_model_file, check_output_path, import_custom_modules, load_model

    check_model_file(args.model)
    check_output_path(output, inputs=[args.model, *other_inputs], force=args.force)
    import_custom_modules(args.custom_module)
    return load_model(args.model, safe_mode=not args.unsafe)


def run(prog: str, work: Callable[[], int], *, debug: bool) -> int:
    """Run `work`, turning the library's typed errors into one stderr line and exit 2."""
    error = None
    try:
        with captured_native_stderr(not debug):
            return work()
    except KerasBnExtError as exc:
        error = str(exc)
        if debug:
            traceback.print_exc()
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        error = f"unexpected {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        if debug:
            traceback.print_exc()
        else:
            error += " (run with --debug for the traceback)"
    print(f"{prog}: error: {error}", file=sys.stderr)
    return EXIT_USAGE


@contextmanager
def timed(seconds: dict, name: str):
    """Record the wall time of a block under `name` (the JSON report's `timings_s`)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = round(time.perf_counter() - start, 4)


def verdict(passed: bool, failed: str = "FAILED") -> str:
    """A check's result, coloured for rich."""
    return "[green]passed[/green]" if passed else f"[red]{failed}[/red]"


def fmt(value: float) -> str:
    return f"{value:.3g}"
