"""Signals that end a run: SIGINT (Ctrl-C), SIGTERM and SIGHUP, all handled alike.

Under `signals_raise()` each of them raises `Interrupted` in the main thread, so the
job's `finally` blocks flush what was generated and leave the output resumable, and
the front end can say so.  Sections that must not be cut in half (publishing a part,
the final merge) run under `deferred()`: a signal arriving there is raised when the
section ends.  Exit codes follow the shell's convention for the signal that asked
(SIGTERM 143), except that SIGHUP, like Ctrl-C, exits 130.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)


class Interrupted(BaseException):
    """A signal asked the run to stop.  `kept` says what of its work is kept, when the
    job knows (set on the way out)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.name = signal.Signals(signum).name
        self.kept: str | None = None
        super().__init__(f"interrupted by {self.name}")

    @property
    def exit_code(self) -> int:
        return 143 if self.signum == getattr(signal, "SIGTERM", None) else 130


_depth = 0
_pending: int | None = None


def _handler(signum: int, frame: FrameType | None) -> None:
    global _pending
    if _depth:
        _pending = signum
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """Turn SIGINT, SIGTERM and SIGHUP into `Interrupted` for the duration (main thread
    only; elsewhere this does nothing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _handler) for signum in _SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold `Interrupted` back until the section ends (sections may nest)."""
    global _depth, _pending
    _depth += 1
    try:
        yield
    except BaseException:
        _depth -= 1
        raise
    _depth -= 1
    if _depth == 0 and _pending is not None:
        signum, _pending = _pending, None
        raise Interrupted(signum)
