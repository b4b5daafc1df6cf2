"""What the command-line tools share: common flags, error handling, exit codes."""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from typing import Callable, Sequence

from keras_bn_ext.cli._native_log import captured_native_stderr
from keras_bn_ext.errors import KerasBnExtError

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1
EXIT_USAGE = 2

EXIT_CODES_HELP = ("exit codes: 0 done and verified, 1 verification failed, 2 bad input or usage, 130/143 "
                   "interrupted/terminated (temporary files removed). Runs on Keras's TensorFlow backend whatever "
                   "KERAS_BACKEND or ~/.keras/keras.json say (a .keras file is backend-independent).")


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
                            "'labels', if any)")
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


def int8_data(args):
    """(calibration arrays, evaluation arrays or None, labels or None) from --int8/--eval
    (labels: the evaluation file's 'labels', else the calibration file's)."""
    from keras_bn_ext.data import load_npz

    calibration = load_npz(args.int8)
    evaluation = load_npz(args.eval_data) if args.eval_data else None
    return calibration, evaluation, (evaluation if evaluation is not None else calibration).get("labels")


def int8_criteria(args):
    from keras_bn_ext.quantization.fidelity import Criteria

    return Criteria(min_top1_agreement=args.min_top1_agreement, max_accuracy_drop=args.max_accuracy_drop,
                    min_sqnr_db=args.min_sqnr_db)


def finish_int8(args, result, seconds: dict, print_table) -> int:
    """Report an INT8 result (JSON or the target's table) and give the exit code."""
    import json

    result.timings_s = {**seconds, **result.timings_s}
    report = {"input": str(args.model), "calibration_file": args.int8, "eval_file": args.eval_data,
              "int8": result.to_dict(), "passed": result.passed}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(result)
    return EXIT_OK if result.passed else EXIT_VERIFY_FAILED


def recalibration_data(model, args) -> list:
    """The arrays of the --data/--recalibrate file for `model`'s inputs, checked (errors
    name the file)."""
    from keras_bn_ext.data import load_npz, model_arrays
    from keras_bn_ext.errors import InputDataError

    data = load_npz(args.data)
    if args.data_key is not None:
        inputs = len(getattr(model, "inputs", None) or [None])
        if inputs != 1:
            raise InputDataError(f"the data key is for one-input models; this one has {inputs} inputs")
        if args.data_key not in data:
            raise InputDataError(f"data file {args.data} has no array '{args.data_key}' "
                                 f"(has: {', '.join(sorted(data))})")
        data = data[args.data_key]
    return model_arrays(model, data, source=str(args.data))


def load_input_model(args, output, *, other_inputs: Sequence[str] = ()):
    """The steps every tool takes before any work, in this order: the input file's own
    errors, the output path (never an input, never an existing file without --force),
    the user's custom modules, then the model itself."""
    from keras_bn_ext.model_io import check_model_file, check_output_path, import_custom_modules, load_model

    from keras_bn_ext.progress import phase

    check_model_file(args.model)
    check_output_path(output, inputs=[args.model, *other_inputs], force=args.force)
    with phase("load"):
        import_custom_modules(args.custom_module)
        return load_model(args.model, safe_mode=not args.unsafe)


EXIT_TERMINATED = 128 + signal.SIGTERM  # 143, as a shell reports a process killed by SIGTERM

# OS errors that are the machine's state, not a bug: one plain line.
_OS_ERRORS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
              errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
              errno.EROFS: "read-only file system"}


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt for SIGINT, so every
    `finally` (temporary files, child processes) runs before the process exits."""


@contextmanager
def terminate_as_interrupt():
    """While the block runs, SIGTERM raises `Terminated` instead of killing the process
    outright (which would leave temporary files behind). A second SIGTERM while the first
    is being handled raises again."""
    def handler(signum, frame):
        f = frame
        while f is not None:
            if f.f_code.co_filename.startswith("<frozen importlib"):
                # Inside an import: an exception raised while an extension module
                # initializes leaves it half-made (seen: SIGSEGV in onnx's import). Ask
                # again once the import is done.
                threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM)).start()
                return
            f = f.f_back
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _os_error_line(exc: OSError) -> str | None:
    what = _OS_ERRORS.get(exc.errno)
    if what is None:
        return None
    where = f" writing {exc.filename}" if exc.filename else ""
    return f"{what}{where} ({exc.strerror or exc}); nothing was written"


def use_tensorflow_backend() -> None:
    """The tools run on TensorFlow whatever the user's Keras backend setting: KERAS_BACKEND
    beats keras.json, and is read when Keras is first imported (not yet, in a fresh CLI
    process: building the parser imports nothing heavy). Called in-process after Keras was
    imported on another backend, the library's BackendError says so."""
    if "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = "tensorflow"
        return
    from keras_bn_ext.errors import require_tensorflow_backend

    require_tensorflow_backend("this tool")


class _TerminalReporter:
    """Each phase on the terminal as it runs (a rich spinner), then a line with its time.
    Writes to the terminal's own stderr (a duplicate taken before TensorFlow's C++ log
    lines are diverted)."""

    def __init__(self, stream):
        from rich.console import Console

        self.console = Console(file=stream, stderr=False)
        self.status = None
        self.bar = None  # (rich Progress, task id) while a phase of counted steps runs
        self.stack: list[str] = []

    def start(self, name: str) -> None:
        self.stack.append(name)
        self._show()

    def done(self, name: str, seconds: float, ok: bool) -> None:
        if self.stack and self.stack[-1] == name:
            self.stack.pop()
        mark = "[green]✓[/green]" if ok else "[red]✗[/red]"
        self._stop()
        self.console.print(f"{mark} {'  ' * len(self.stack)}{name} ({seconds:.1f} s)", highlight=False)
        if self.stack:
            self._show()

    def update(self, name: str, completed: int, total: int) -> None:
        if self.bar is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._stop()
            bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                           console=self.console, transient=True)
            bar.start()
            self.bar = (bar, bar.add_task(" / ".join(self.stack), total=total))
        bar, task = self.bar
        bar.update(task, completed=completed, total=total)

    def _show(self) -> None:
        self._stop()
        self.status = self.console.status(" / ".join(self.stack) + " …")
        self.status.start()

    def _stop(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None
        if self.bar is not None:
            self.bar[0].stop()
            self.bar = None


@contextmanager
def _progress(enabled: bool):
    """A terminal reporter when stderr is a terminal and `enabled` (not --json), else none."""
    from keras_bn_ext import progress

    if not enabled or not sys.stderr.isatty():
        with progress.reporting(None):
            yield
        return
    stream = os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1)
    reporter = _TerminalReporter(stream)
    try:
        with progress.reporting(reporter):
            yield
    finally:
        reporter._stop()
        stream.close()


def run(prog: str, work: Callable[[], int], *, debug: bool, show_progress: bool = True,
        json_errors: bool = False) -> int:
    """Run `work`, turning the library's typed errors (and a full disk, a permission
    error) into one stderr line and exit 2 (1 for a fold found wrong: `FoldError`, nothing
    written); SIGTERM and Ctrl-C clean up and exit 143/130. With `json_errors` (--json)
    the same error is also printed on stdout as one JSON object,
    `{"error": {"code", "message", "layer", "op"}}`. On a terminal (and with
    `show_progress`: not --json), the library's phases are shown as they run."""
    error, code, exc_seen, status = None, "unexpected", None, EXIT_USAGE
    try:
        use_tensorflow_backend()
        with terminate_as_interrupt(), _progress(show_progress), captured_native_stderr(not debug):
            return work()
    except Terminated:
        # Every `finally` has run (temporary files removed, child processes killed). Exit
        # now, without the interpreter's teardown: TensorFlow's threads, stopped mid-work,
        # can crash it (seen as SIGSEGV after a clean-up that had succeeded).
        message = "terminated (SIGTERM); temporary files removed, nothing written"
        print(f"{prog}: {message}", file=sys.stderr)
        if json_errors:
            _print_json_error("terminated", message, None)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_TERMINATED)
    except KeyboardInterrupt:
        message = "interrupted; temporary files removed, nothing written"
        print(f"{prog}: {message}", file=sys.stderr)
        if json_errors:
            _print_json_error("interrupted", message, None)
        return 130
    except KerasBnExtError as exc:
        error, code, exc_seen = str(exc), exc.code, exc
        if exc.code == "fold_not_exact":
            status = EXIT_VERIFY_FAILED
        if debug:
            traceback.print_exc()
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        error = _os_error_line(exc) if isinstance(exc, OSError) else None
        code = "os_error" if error is not None else "unexpected"
        if debug:
            traceback.print_exc()
        if error is None:
            error = f"unexpected {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            if not debug:
                error += " (run with --debug for the traceback)"
    print(f"{prog}: error: {error}", file=sys.stderr)
    if json_errors:
        _print_json_error(code, error, exc_seen)
    return status


def json_usage_errors(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.ArgumentParser:
    """With --json among `argv`, a usage error also prints the one JSON error object
    (code "usage") on stdout before argparse's own message and exit 2."""
    args = sys.argv[1:] if argv is None else argv
    if "--json" in args:
        usage_error = parser.error

        def error(message):
            _print_json_error("usage", message, None)
            usage_error(message)

        parser.error = error
    return parser


def _print_json_error(code: str, message: str, exc) -> None:
    import json

    print(json.dumps({"error": {"code": code, "message": message, "layer": getattr(exc, "layer", None),
                                "op": getattr(exc, "op", None)}}))


@contextmanager
def timed(seconds: dict, name: str):
    """Record the wall time of a block under `name` (the JSON report's `timings_s`)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = round(time.perf_counter() - start, 4)


def output_table(title: str, outputs):
    """A rich table of per-output errors (`compare.OutputError`s), the same for every target."""
    from rich.table import Table

    table = Table(title=title)
    # NaN/inf: shown when any output has some, in the reference or the candidate.
    special = any(o.nonfinite_mismatches or o.reference_nonfinite for o in outputs)
    columns = ("output", "max abs err", "max rel err", "mean abs err") + (("NaN/inf mismatches",) if special else ())
    for column in columns + ("result",):
        table.add_column(column)
    for o in outputs:
        cells = [o.name, fmt(o.max_abs_err), fmt(o.max_rel_err), fmt(o.mean_abs_err)]
        if special:
            cells.append(f"{o.nonfinite_mismatches:,} (reference has {o.reference_nonfinite:,})")
        table.add_row(*cells, verdict(o.passed))
    return table


def exact_line(exact, *, original: str, candidate: str, what: str) -> str:
    """The float64 judgement (`compare.ExactArithmeticCheck`) in one line, the same for every
    tool: whether its float64 reference could judge at all, then the verdict."""
    if not exact.reference_valid:
        return (f"float64 judgement not applied ({exact.reference_code}): {exact.reference_reason}; "
                f"{exact.reference_detail or ''} — the float32 verdict stands: {verdict(False)}")
    bad = (f", {exact.candidate_nonfinite_mismatches:,} NaN/inf where the reference has none"
           if exact.candidate_nonfinite_mismatches else "")
    return (f"against the model in float64 (exact arithmetic, its twin checked layer by layer): {original} "
            f"{fmt(exact.original_max_rel_err)}, {candidate} {fmt(exact.candidate_max_rel_err)} relative{bad} — "
            f"{what} adds no error beyond float32 rounding: {verdict(exact.passed)}")


def fidelity_table(fidelity):
    """A rich table of an INT8 file's `FidelityReport` against the float Keras model, the same
    for every target."""
    from rich.table import Table

    table = Table(title=f"INT8 vs the float Keras model ({fidelity.samples} samples)")
    for column in ("output", "SQNR dB", "max rel err", "mean rel err", "top-1 agreement", "accuracy float -> INT8",
                   "result"):
        table.add_column(column)
    for o in fidelity.outputs:
        acc = (f"{o.accuracy_float:.4f} -> {o.accuracy_quantized:.4f} ({-o.accuracy_drop_pt:+.2f} pt)"
               if o.accuracy_float is not None else "-")
        agree = f"{o.top1_agreement:.4f}" if o.top1_agreement is not None else "-"
        table.add_row(o.name, f"{o.sqnr_db:.1f}", fmt(o.max_rel_err), fmt(o.mean_rel_err), agree, acc,
                      verdict(o.passed, "FAILED: " + ", ".join(o.failed)))
    return table


def print_equalization(console, report, max_rel_err) -> None:
    """What cross-layer equalization did (an `EqualizationReport`; None: not applied)."""
    if report is None:
        return
    exact = f"; verified exact to {fmt(max_rel_err)} relative" if max_rel_err is not None else ""
    console.print(f"cross-layer equalization: {len(report.pairs)} pairs ({report.sweeps} sweeps), "
                  f"{len(report.skipped)} left alone{exact}")
    for s in report.skipped:
        console.print(f"  left alone [{s.code}]: {s.reason}")
    if report.relu6_replaced:
        console.print(f"  [yellow]ReLU6 replaced by ReLU (the function changed): "
                      f"{', '.join(report.relu6_replaced)}[/yellow]")


def verdict(passed: bool, failed: str = "FAILED") -> str:
    """A check's result, coloured for rich."""
    return "[green]passed[/green]" if passed else f"[red]{failed}[/red]"


def fmt(value: float) -> str:
    return f"{value:.3g}"
