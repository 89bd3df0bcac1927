"""A compact set of 64-bit id hashes, for duplicate detection over streamed input.

A Python set of ints costs ~60 bytes an id (600 MB at 10M rows); this keeps sorted
uint64 runs (8 bytes an id) plus a small set of the most recent ids, merging runs
LSM-style so a lookup touches only a logarithmic number of them.
"""

from __future__ import annotations

import numpy as np


class SeenIds:
    def __init__(self, buffer_size: int = 1 << 16) -> None:
        self._buffer_size = buffer_size
        self._recent: set[int] = set()
        self._runs: list[np.ndarray] = []  # sorted, unique, sizes decreasing

    def __len__(self) -> int:
        return len(self._recent) + sum(len(r) for r in self._runs)

    def __contains__(self, h: int) -> bool:
        if h in self._recent:
            return True
        v = np.uint64(h)
        for run in self._runs:
            i = int(np.searchsorted(run, v))
            if i < len(run) and run[i] == v:
                return True
        return False

    def add(self, h: int) -> bool:
        """Add `h`; False if it was already there."""
        if h in self:
            return False
        self._recent.add(h)
        if len(self._recent) >= self._buffer_size:
            self._flush()
        return True

    def _flush(self) -> None:
        run = np.fromiter(self._recent, dtype=np.uint64, count=len(self._recent))
        run.sort()
        self._recent = set()
        self._runs.append(run)
        # Merge while a run is at least half its predecessor: O(log n) runs in all.
        while len(self._runs) >= 2 and 2 * len(self._runs[-1]) >= len(self._runs[-2]):
            b = self._runs.pop()
            a = self._runs.pop()
            merged = np.concatenate([a, b])
            merged.sort(kind="stable")
            self._runs.append(merged)
