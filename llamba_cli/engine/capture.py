"""What C code prints on file descriptor 2, taken without eating anyone else's output.

llama.cpp's grammar parser reports a syntax error with `fprintf(stderr, ...)`, not
through the log callback, so the only way to learn why a grammar failed is to read
descriptor 2 while it compiles.  Descriptor 2 belongs to the whole process: while it
points at a pipe, anything any thread writes to stderr (a progress bar, a warning,
a log line) lands in that pipe too.  So the window is as short as one llama.cpp call;
afterwards `claim` picks out the bytes the caller expected (the parser's message) and
everything else is written back to the real stderr: other output is delayed by the
length of the call, never lost (a line another thread writes just after the window
may come out before the lines it wrote during it).  A lock keeps two captures from
nesting; a thread drains the pipe while the call runs, so a long message cannot fill
it and block the writer.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

__all__ = ["Captured", "capture_stderr"]

_LOCK = threading.Lock()


@dataclass
class Captured:
    """Set when the `capture_stderr` block ends: the bytes `claim` took."""

    claimed: bytes = b""


@contextlib.contextmanager
def capture_stderr(claim: Callable[[bytes], tuple[bytes, bytes]]) -> Iterator[Captured]:
    """Point descriptor 2 at a pipe for the duration of the block.  On exit,
    `claim(printed)` returns (the bytes meant for the caller, the rest); the caller's
    bytes go to `Captured.claimed`, the rest back to stderr.  With LLAMBA_LLAMA_LOG set
    (llama.cpp's own output asked for) everything goes back to stderr as well."""
    got = Captured()
    with _LOCK:
        with contextlib.suppress(Exception):
            sys.stderr.flush()  # Python's pending output goes where it was meant to
        read_end, write_end = os.pipe()
        chunks: list[bytes] = []
        reader = threading.Thread(target=_drain, args=(read_end, chunks), daemon=True)
        reader.start()
        saved = os.dup(2)
        try:
            os.dup2(write_end, 2)
        finally:
            os.close(write_end)  # from here descriptor 2 holds the only write end
        try:
            yield got
        finally:
            os.dup2(saved, 2)  # drops the pipe's last write end: the reader sees EOF
            os.close(saved)
            reader.join()
            os.close(read_end)
            printed = b"".join(chunks)
            got.claimed, rest = claim(printed)
            _write_all(2, printed if os.environ.get("LLAMBA_LLAMA_LOG") else rest)


def _drain(fd: int, chunks: list[bytes]) -> None:
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except OSError:  # stderr closed or gone: nothing more to do
            return
        view = view[n:]
