"""The verify-and-commit stage every written file goes through.

A candidate is produced at a temporary path beside the output, checked there against
its reference, and committed by a rename — or nothing is left. Every output of the
project takes this one road: `fold_to_file` and `recalibrate_to_file` (.keras), the ONNX
float and INT8 files, the LiteRT float and INT8 files. A target brings two callables,
`produce` (its converter or writer, into the temporary path) and `check` (its runner on
that path, compared with the reference); the stage owns the temporary name, the timing
and progress of both steps, the decision to commit, and the clean-up when the check
says no, an exception is raised or a signal arrives (the CLIs turn SIGTERM into
KeyboardInterrupt, so the same `finally` runs).

Whether a failed check still commits is the caller's policy: a float export that misses
its tolerance is kept for inspection (and says so, exit 1), a .keras file that does not
load back is not written at all.

An output that is a file with companions (an ONNX model and its external-data file, which
the model names relative to itself) is produced as a bundle: in a temporary directory
beside the output, under the final names, so the check runs the files exactly as they
will lie; the commit moves the companions first and the main file last, with SIGINT and
SIGTERM held back until both renames are done.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Generic, Iterator, Protocol, TypeVar

from keras_bn_ext.model_io import atomic_output
from keras_bn_ext.progress import phase

__all__ = ["COMMIT_CODES", "Check", "FileCheck", "StageRecord", "Staged", "atomic_bundle", "reloaded_keras_check",
           "verify_and_commit"]

# What the stage did with the candidate; `StageRecord.code`.
COMMIT_CODES = {
    "passed": "the candidate passed its check and was renamed into place",
    "kept_failed": "the candidate failed its check and was renamed into place for inspection",
    "not_written": "the candidate failed its check and was removed; nothing was written",
}


class Check(Protocol):
    """What a `check` returns: anything with a `passed` verdict."""

    @property
    def passed(self) -> bool: ...


@dataclass
class FileCheck:
    """A written file read back from its temporary name, as a user would, against what was
    verified before it was written — the one `check` of every file that is not an export's
    first verification: a .keras file reloaded (`comparison` of its outputs, and for
    recalibration its BN statistics bit for bit), an INT8 file run again (its outputs equal
    the measured ones bit for bit, `reproduced`; it passes only where `fidelity` passed).
    A check not made is None; at least one must be made."""

    comparison: object | None = None  # compare.ComparisonReport: the reloaded file vs the verified model
    reload_error: str | None = None  # the file did not load back (nothing else was checked)
    statistics_equal: bool | None = None  # recalibration: the BN statistics, bit for bit
    reproduced: bool | None = None  # INT8: the outputs equal the measured ones, bit for bit
    fidelity: object | None = None  # INT8: quantization.fidelity.FidelityReport of the measurement

    @property
    def passed(self) -> bool:
        made = [c for c in (self.comparison and self.comparison.passed, self.statistics_equal, self.reproduced,
                            self.fidelity and self.fidelity.passed) if c is not None]
        return self.reload_error is None and bool(made) and all(made)



# A reloaded .keras file holds the same float32 graph and weights as the model it was saved
# from: only a kernel's choice of summation order could differ, so it must match to 1e-6.
RELOAD_RTOL = 1e-6


def reloaded_keras_check(tmp, expected: list, batches: list, names: list[str], *, safe_mode: bool,
                         what: str = "the model", also: Callable | None = None) -> FileCheck:
    """The `check` of every .keras file the project writes: load `tmp` back as a user would
    and compare its outputs on `batches` with `expected` (the verified model's, to
    `RELOAD_RTOL`); `also(reloaded)` adds checks of its own as FileCheck fields (a dict).
    A file that does not load is a `reload_error` line naming `what`."""
    import keras

    from keras_bn_ext.compare import compare_output_lists, keras_outputs

    try:
        reloaded = keras.saving.load_model(tmp, compile=False, safe_mode=safe_mode)
    except Exception as exc:  # noqa: BLE001 - any load failure means the file is unusable
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        return FileCheck(reload_error=f"{what} was saved but does not load back: {type(exc).__name__}: {first}")
    comparison = compare_output_lists(expected, [keras_outputs(reloaded, b) for b in batches], names, atol=0.0,
                                      rtol=RELOAD_RTOL)
    return FileCheck(comparison=comparison, **(also(reloaded) if also is not None else {}))

P = TypeVar("P")
C = TypeVar("C", bound=Check)


@dataclass
class StageRecord:
    """What the stage did, as typed fields (`to_dict` for JSON)."""

    output: str | None  # the committed path; None when nothing was written
    code: str  # one of COMMIT_CODES
    timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def committed(self) -> bool:
        return self.output is not None

    @property
    def reason(self) -> str:
        return COMMIT_CODES[self.code]

    def to_dict(self) -> dict:
        return {"output": self.output, "code": self.code, "reason": self.reason, "timings_s": self.timings_s}


@dataclass
class Staged(Generic[P, C]):
    """The stage's result: what `produce` and `check` returned, and what was committed."""

    product: P
    check: C
    record: StageRecord


def verify_and_commit(
    path: str | os.PathLike,
    produce: Callable[[Path], P],
    check: Callable[[Path, P], C],
    *,
    keep_failed: bool | Callable[[C], bool] = False,
    produce_name: str = "write",
    check_name: str = "verify",
    produce_phase: str | None = None,
    check_phase: str | None = None,
    bundle: bool = False,
) -> Staged[P, C]:
    """Produce a candidate for `path`, check it where it lies, commit it or leave nothing.

    Args:
        path: The output file. Replaced atomically; its directory must exist.
        produce: Writes the candidate to the temporary path it is given (same directory
            and suffix as `path`) and returns its report.
        check: Runs the candidate from the temporary path (as a user would run the
            file) against the reference and returns an object with `passed`.
        keep_failed: Commit a candidate whose check failed (for inspection): True, False,
            or a predicate on the check's result (e.g. "the file reproduces what was
            measured, though a criterion was missed").
        produce_name, check_name: Keys of the two steps' seconds in `timings_s`.
        produce_phase, check_phase: Progress phase names (default: the keys).
        bundle: `produce` may write companion files beside the path it is given (in a
            temporary directory, the path under the output's own name); all are
            committed together, the path last.

    Returns:
        A `Staged` with the product, the check and the `StageRecord`.

    Raises:
        Whatever `produce` or `check` raise; the temporary file is removed first.
    """
    timings: dict[str, float] = {}

    def timed(name, label, fn):
        start = time.perf_counter()
        with phase(label or name.replace("_", " ")):
            value = fn()
        timings[name] = round(time.perf_counter() - start, 4)
        return value

    output = atomic_bundle if bundle else atomic_output
    try:
        with output(path) as tmp:
            product = timed(produce_name, produce_phase, lambda: produce(tmp))
            result = timed(check_name, check_phase, lambda: check(tmp, product))
            if result.passed:
                code = "passed"
            elif keep_failed(result) if callable(keep_failed) else keep_failed:
                code = "kept_failed"
            else:
                raise _Abandon()
    except _Abandon:  # the temporary file (or directory) was removed
        return Staged(product, result, StageRecord(output=None, code="not_written", timings_s=timings))
    return Staged(product, result, StageRecord(output=str(Path(path)), code=code, timings_s=timings))


@contextlib.contextmanager
def atomic_bundle(path: str | os.PathLike) -> Iterator[Path]:
    """Yield `TMPDIR/<name of path>` in a temporary directory beside `path`; when the
    block succeeds, move every file written there beside `path` (companions first, `path`
    last), else remove the directory. Signals wait until the renames are done."""
    path = Path(path)
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.resolve().parent))
    try:
        main = work / path.name
        yield main
        if not main.exists():
            raise FileNotFoundError(f"the bundle's main file {main} was not written")
        umask = os.umask(0)
        os.umask(umask)
        companions = [f for f in sorted(work.iterdir()) if f != main]
        with _signals_held():
            for file in companions + [main]:
                os.chmod(file, 0o666 & ~umask)
                os.replace(file, path.parent / file.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM delivered after the block (main thread; elsewhere, nothing held)."""
    signals = {signal.SIGINT, signal.SIGTERM}
    try:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    except (AttributeError, ValueError, OSError):
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class _Abandon(Exception):
    """Leave the atomic_output block without renaming."""
