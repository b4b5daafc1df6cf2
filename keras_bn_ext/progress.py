"""What long work is doing, phase by phase: the library marks its phases (load, fold,
convert, calibrate, verify, write) with `phase(name)`; nothing is shown unless a caller
installs a reporter (the command-line tools do, on a terminal, without --json)."""

from __future__ import annotations

import contextvars
import time
from contextlib import contextmanager
from typing import Iterator, Protocol

__all__ = ["Reporter", "phase", "reporting"]


class Reporter(Protocol):
    def start(self, name: str) -> None: ...

    def done(self, name: str, seconds: float, ok: bool) -> None: ...


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
def reporting(reporter: Reporter | None) -> Iterator[None]:
    """Show the phases run inside the block on `reporter` (None: nothing)."""
    token = _REPORTER.set(reporter)
    try:
        yield
    finally:
        _REPORTER.reset(token)
