"""Incremental detokenization with stop strings, handed out as safe deltas.

A character's UTF-8 bytes can be split across tokens, so text is decoded from the
accumulated bytes by an incremental decoder that holds incomplete sequences back.
Stop strings are matched on the text, across token boundaries, and are excluded
from the result.  `take()` hands out the text that can no longer change: it holds
back the longest tail that could still grow into a stop string, so a stop string
(or a part of one) never reaches a caller, and the deltas concatenated are exactly
the final text.
"""

from __future__ import annotations

import codecs


class TextStream:
    """Text of one sequence's generated tokens, fed one token's bytes at a time."""

    def __init__(self, stop: tuple[str, ...] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = stop
        self._max_stop = max((len(s) for s in stop), default=0)
        self._sent: list[str] = []  # text handed out by take()
        self._pending = ""  # decoded text not handed out yet
        self._tail = ""  # last max_stop-1 chars, where a stop string may begin
        self.stopped = False
        self._closed = False

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
                    # Only text `take()` held back can begin a stop string.
                    assert len(self._pending) >= -keep
                    self._pending = self._pending[:keep]
                else:
                    self._pending += new[:keep]
                self.stopped = True
                return True
            self._tail = window[-(self._max_stop - 1) :] if self._max_stop > 1 else ""
        self._pending += new
        return False

    def take(self) -> str:
        """The text added since the last call that can no longer change: all of it
        once the stream stopped or closed, else all but a tail that may begin a stop
        string (and any bytes of an incomplete character)."""
        n = len(self._pending)
        if not (self.stopped or self._closed):
            n -= self._held()
        out, self._pending = self._pending[:n], self._pending[n:]
        if out:
            self._sent.append(out)
        return out

    def _held(self) -> int:
        """Length of the longest tail of the pending text that is a proper prefix of a
        stop string.  A tail that could begin a stop string never started in text
        already handed out: that text ended where no stop string could begin."""
        text = self._pending
        best = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def close(self) -> str:
        """Flush bytes held back for an incomplete character (as U+FFFD) and return the
        final text. Call when the sequence ends; `take()` then returns the rest."""
        if not self.stopped and not self._closed:
            self._pending += self._decoder.decode(b"", final=True)
        self._closed = True
        return self.text

    @property
    def text(self) -> str:
        """Text so far (an incomplete trailing character is not included yet)."""
        if len(self._sent) > 1:
            self._sent = ["".join(self._sent)]
        return (self._sent[0] if self._sent else "") + self._pending
