"""How a command-line tool runs its work: exit codes, typed errors turned into one line (and a
JSON object with --json), SIGTERM cleaned up like Ctrl-C, TensorFlow as the backend."""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from typing import Callable

from keras_bn_ext.cli._native_log import captured_native_stderr
from keras_bn_ext.cli._progress import terminal_progress
from keras_bn_ext.errors import KerasBnExtError

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1
EXIT_USAGE = 2

EXIT_TERMINATED = 128 + signal.SIGTERM  # 143, as a shell reports a process killed by SIGTERM


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
        with terminate_as_interrupt(), terminal_progress(show_progress), captured_native_stderr(not debug):
            return work()
    except Terminated:
        # Every `finally` has run (temporary files removed, child processes killed). Exit
        # now, without the interpreter's teardown: TensorFlow's threads, stopped mid-work,
        # can crash it (seen as SIGSEGV after a clean-up that had succeeded).
        message = "terminated (SIGTERM); temporary files removed, nothing written"
        print(f"{prog}: {message}", file=sys.stderr)
        if json_errors:
            print_json_error("terminated", message, None)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_TERMINATED)
    except KeyboardInterrupt:
        message = "interrupted; temporary files removed, nothing written"
        print(f"{prog}: {message}", file=sys.stderr)
        if json_errors:
            print_json_error("interrupted", message, None)
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
        print_json_error(code, error, exc_seen)
    return status


def print_json_error(code: str, message: str, exc) -> None:
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
