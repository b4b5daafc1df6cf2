"""The library's progress phases on the terminal while a tool runs (rich)."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager


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
def terminal_progress(enabled: bool):
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
