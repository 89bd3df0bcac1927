"""Automatic cross-row prefix cache.

Rows of a batch job usually share a leading run of tokens (system prompt, the
fixed head of a template, a few-shot block; n samples share a whole prompt).  When
a new request shares at least `min_tokens` leading tokens with a request still
queued or running, that run becomes a `PrefixEntry`: it is evaluated once, on a
sequence id of its own, and every request that starts with it gets its KV by
`llama_memory_seq_cp` (under unified KV: tagging cells, no copy) and evaluates only
its own tail.

This is the safe form of "token grouping": only identical prefixes at identical
positions are shared, so every sequence's KV is exactly what evaluating its own
tokens would give (up to llama.cpp's batch-shape noise).  Entries are evicted,
least recently used first, when their sequence ids or token budget run out, or
when the KV cache is full; after that the cache makes no new entries until the
scheduler resumes it (a request finished and freed its KV), so a plan that did not
fit is not rebuilt with the same entry.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


@dataclass(eq=False)
class PrefixEntry:
    """A cached prefix: `tokens` evaluated (up to `num_computed`) on `seq_id`."""

    seq_id: int
    tokens: list[int]
    array: np.ndarray
    num_computed: int = 0
    last_used: int = 0
    score_from: int = -1

    @property
    def num_pending(self) -> int:
        return len(self.tokens) - self.num_computed

    @property
    def ready(self) -> bool:
        return self.num_computed >= len(self.tokens)

    def wants_logits(self, pos: int) -> bool:
        return False


def common_prefix_len(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


@dataclass
class Hit:
    """Outcome of a lookup: copy `n` tokens of `entry`, or wait for it to be computed."""

    entry: PrefixEntry
    n: int

    @property
    def ready(self) -> bool:
        return self.entry.num_computed >= self.n


class PrefixCache:
    """Entries on the sequence ids `seq_ids`, holding at most `budget` tokens in all."""

    def __init__(self, seq_ids: Iterable[int], *, budget: int, min_tokens: int) -> None:
        self.free_ids = list(seq_ids)[::-1]
        self.budget = budget
        self.min_tokens = min_tokens
        self.entries: list[PrefixEntry] = []
        self._clock = 0
        self._pinned: set[int] = set()  # seq ids of entries shared during this step
        self.suspended = False  # no new entries (KV pressure) until resumed

    def begin_step(self) -> None:
        """Entries shared in the previous step may be evicted again."""
        self._pinned.clear()

    @property
    def used_tokens(self) -> int:
        return sum(len(e.tokens) for e in self.entries)

    def lookup(
        self, prompt: np.ndarray, others: Iterable[np.ndarray]
    ) -> tuple[Hit | None, list[int]]:
        """Find (or create) the entry whose KV `prompt` should start from.

        `prompt` keeps at least its last token to evaluate (its logits are needed).
        `others` are prompts of requests queued or running; sharing at least
        `min_tokens` with one of them creates a new entry.  Returns the hit (None:
        evaluate everything) and the sequence ids of entries evicted to make room,
        whose KV the caller must drop before the next decode.
        """
        self._clock += 1
        usable = prompt[: len(prompt) - 1]
        best: Hit | None = None
        for e in self.entries:
            n = common_prefix_len(usable, e.array)
            if n >= self.min_tokens and (best is None or n > best.n):
                best = Hit(e, n)
        if best is not None:
            best.entry.last_used = self._clock
            if best.ready:
                self._pinned.add(best.entry.seq_id)
            return best, []
        if self.suspended:
            return None, []
        shared = 0
        for other in others:
            shared = max(shared, common_prefix_len(usable, other[: len(other) - 1]))
        if shared < self.min_tokens or shared > self.budget:
            return None, []
        evicted = self._make_room(shared)
        if not self.free_ids:
            return None, evicted
        tokens = usable[:shared].tolist()
        entry = PrefixEntry(
            self.free_ids.pop(), tokens, usable[:shared].copy(), last_used=self._clock
        )
        self.entries.append(entry)
        return Hit(entry, shared), evicted

    def _make_room(self, n_tokens: int) -> list[int]:
        evicted: list[int] = []
        candidates = sorted(
            (e for e in self.entries if e.seq_id not in self._pinned), key=lambda e: e.last_used
        )
        while candidates and (not self.free_ids or self.used_tokens + n_tokens > self.budget):
            evicted.append(self._drop(candidates.pop(0)))
        return evicted

    def _drop(self, entry: PrefixEntry) -> int:
        self.entries.remove(entry)
        self.free_ids.append(entry.seq_id)
        return entry.seq_id

    def evict_all(self) -> list[int]:
        """Drop every entry and make no new ones until `suspended` is cleared (KV
        pressure); returns the entries' sequence ids."""
        self.suspended = True
        return [self._drop(e) for e in list(self.entries)]

    def pending(self) -> list[PrefixEntry]:
        """Entries whose tokens still need evaluating, oldest first."""
        return [e for e in self.entries if e.num_pending > 0]
