"""What long work is doing, phase by phase: the library marks its phases (load, fold,
convert, calibrate, verify, write) with `phase(name)`, and a phase of counted steps
(calibration batches) with `steps(name, total)`; nothing is shown unless a caller installs
a reporter (the command-line tools do, on a terminal, without --json)."""

from __future__ import annotations

import contextvars
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Protocol

__all__ = ["Reporter", "phase", "reporting", "steps"]


class Reporter(Protocol):
    def start(self, name: str) -> None: ...

    def done(self, name: str, seconds: float, ok: bool) -> None: ...

    def update(self, name: str, completed: int, total: int) -> None: ...


_REPORTER: contextvars.ContextVar[Reporter | None] = contextvars.ContextVar("keras_bn_ext_reporter", default=None)


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Mark a phase of long work (nested phases are shown too)."""
    reporter = _REPORTER.get()
    if reporter is None:
        yield
        return
    start = time.perf_counter()
    reporter.start(name)
    ok = False
    try:
        yield
        ok = True
    finally:
        reporter.done(name, time.perf_counter() - start, ok)


@contextmanager
def steps(name: str, total: int) -> Iterator[Callable[[], None]]:
    """A phase of `total` counted steps; the block calls the yielded `advance()` after each
    (a progress bar on the terminal). Steps past `total` (a calibrator that reads its data
    twice) start the count again rather than overflow it. `total` 0: a plain phase."""
    reporter = _REPORTER.get()
    done = 0

    def advance() -> None:
        nonlocal done
        done = done % total + 1 if total else done + 1
        if reporter is not None and total:
            reporter.update(name, done, total)

    with phase(name):
        if reporter is not None and total:
            reporter.update(name, 0, total)
        yield advance


@contextmanager
def reporting(reporter: Reporter | None) -> Iterator[None]:
    """Show the phases run inside the block on `reporter` (None: nothing)."""
    token = _REPORTER.set(reporter)
    try:
        yield
    finally:
        _REPORTER.reset(token)
