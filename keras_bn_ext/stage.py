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
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Generic, Protocol, TypeVar

from keras_bn_ext.model_io import atomic_output
from keras_bn_ext.progress import phase

__all__ = ["COMMIT_CODES", "Check", "StageRecord", "Staged", "verify_and_commit"]

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

    try:
        with atomic_output(path) as tmp:
            product = timed(produce_name, produce_phase, lambda: produce(tmp))
            result = timed(check_name, check_phase, lambda: check(tmp, product))
            if result.passed:
                code = "passed"
            elif keep_failed(result) if callable(keep_failed) else keep_failed:
                code = "kept_failed"
            else:
                raise _Abandon()
    except _Abandon:  # atomic_output removed the temporary file
        return Staged(product, result, StageRecord(output=None, code="not_written", timings_s=timings))
    return Staged(product, result, StageRecord(output=str(Path(path)), code=code, timings_s=timings))


class _Abandon(Exception):
    """Leave the atomic_output block without renaming."""
