"""Incremental detokenization with stop strings.

A character's UTF-8 bytes can be split across tokens, so text is decoded from the
accumulated bytes by an incremental decoder that holds incomplete sequences back.
Stop strings are matched on the text, across token boundaries, and are excluded
from the result.
"""

from __future__ import annotations

import codecs


class TextStream:
    """Text of one sequence's generated tokens, fed one token's bytes at a time."""

    def __init__(self, stop: tuple[str, ...] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = stop
        self._max_stop = max((len(s) for s in stop), default=0)
        self._parts: list[str] = []
        self._len = 0
        self._tail = ""  # last max_stop-1 chars, where a stop string may begin
        self.stopped = False

    def feed(self, piece: bytes) -> bool:
        """Append one token's bytes. Returns True when a stop string completed
        (the text is then cut before it and nothing more may be fed)."""
        new = self._decoder.decode(piece)
        if not new:
            return False
        if self._max_stop:
            window = self._tail + new
            cut = min((i for i in (window.find(s) for s in self._stop) if i >= 0), default=-1)
            if cut >= 0:
                keep = cut - len(self._tail)  # may be negative: the stop began in earlier text
                if keep < 0:
                    self._truncate_tail(-keep)
                else:
                    self._append(new[:keep])
                self.stopped = True
                return True
            self._tail = window[-(self._max_stop - 1) :] if self._max_stop > 1 else ""
        self._append(new)
        return False

    def _append(self, s: str) -> None:
        self._parts.append(s)
        self._len += len(s)

    def _truncate_tail(self, n: int) -> None:
        """Remove the last `n` characters already appended."""
        text = "".join(self._parts)
        self._parts = [text[: len(text) - n]]
        self._len = len(self._parts[0])

    def close(self) -> str:
        """Flush bytes held back for an incomplete character (as U+FFFD) and return the
        final text. Call once, when the sequence ends."""
        if not self.stopped:
            rest = self._decoder.decode(b"", final=True)
            if rest:
                self._append(rest)
        return self.text

    @property
    def text(self) -> str:
        """Text so far (an incomplete trailing character is not included yet)."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""
