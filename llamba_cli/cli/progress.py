"""Progress for people and for cron: a rich bar on a terminal, log lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # rich loads only for a bar: log lines need none of it
    from rich.console import Console
    from rich.progress import TaskID


class RichProgress:
    """A live bar: rows done/total, errors, generated tokens/s, ETA."""

    def __init__(self, console: Console) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = console
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[errors]} errors"),
            TextColumn("{task.fields[tps]:.1f} tok/s"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._task: TaskID | None = None
        self._t0 = time.perf_counter()
        self._tokens = 0
        self._errors = 0

    def start(self, total: int | None, unit: str) -> None:
        self._t0 = time.perf_counter()
        self._progress.start()
        self._task = self._progress.add_task(unit, total=total, errors=0, tps=0.0)

    def advance(self, rows: int, errors: int, tokens: int) -> None:
        self._tokens += tokens
        self._errors += errors
        dt = time.perf_counter() - self._t0
        if self._task is not None:
            self._progress.update(
                self._task,
                advance=rows,
                errors=self._errors,
                tps=self._tokens / dt if dt > 0 else 0.0,
            )

    def note(self, text: str) -> None:
        self.console.print(text, style="dim", markup=False, highlight=False)

    def stop(self) -> None:
        self._progress.stop()


class LogProgress:
    """One plain line every `interval` seconds (stderr is not a terminal: cron, CI)."""

    def __init__(self, interval: float = 10.0, stream=None) -> None:
        self.interval = interval
        self.stream = stream or sys.stderr
        self.total: int | None = None
        self.unit = "rows"
        self.done = 0
        self.errors = 0
        self.tokens = 0
        self._t0 = time.perf_counter()
        self._last = self._t0

    def _line(self, text: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        print(f"{stamp} llamba: {text}", file=self.stream, flush=True)

    def start(self, total: int | None, unit: str) -> None:
        self.total, self.unit = total, unit
        self._t0 = self._last = time.perf_counter()
        self._line(f"started: {total if total is not None else 'unknown number of'} {unit}")

    def advance(self, rows: int, errors: int, tokens: int) -> None:
        self.done += rows
        self.errors += errors
        self.tokens += tokens
        now = time.perf_counter()
        if now - self._last >= self.interval:
            self._last = now
            self._line(self.status(now))

    def status(self, now: float) -> str:
        dt = max(now - self._t0, 1e-9)
        rate = self.done / dt
        text = f"{self.done}"
        if self.total:
            pct = 100.0 * self.done / self.total
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            text += f"/{self.total} {self.unit} ({pct:.0f}%), eta {_duration(eta)}"
        else:
            text += f" {self.unit}"
        return f"{text}, {self.errors} errors, {self.tokens / dt:.1f} tok/s"

    def note(self, text: str) -> None:
        self._line(text)

    def stop(self) -> None:
        pass


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    s = int(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
