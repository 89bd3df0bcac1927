"""Scheduler: which tokens go into the next `llama_decode`.

A fixed pool of `slots` sequence ids.  Each step:
1. refill free slots from the waiting queue at once (taking cached prefix KV when the
   prefix cache has it, or deferring a request for a step while its shared prefix is
   being evaluated);
2. give every running request with exactly one pending token (a decode) its token;
3. fill the rest of the `n_batch` budget with chunks of pending prefixes and
   prompts, oldest first.

It never touches llama.cpp: KV operations the step needs (entries to evict, prefix
KV to share) are returned in the `Plan` for the engine to apply before decoding.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from llamba_cli.engine.prefix_cache import PrefixCache
from llamba_cli.engine.request import Request, Status


class Owner(Protocol):
    """What a chunk is cut from: a `Request` or a `PrefixEntry`."""

    seq_id: int
    tokens: list[int]
    num_computed: int
    score_from: int

    def wants_logits(self, pos: int) -> bool: ...


@dataclass
class Chunk:
    owner: Owner
    start: int
    end: int


@dataclass
class Plan:
    chunks: list[Chunk] = field(default_factory=list)
    evict: list[int] = field(default_factory=list)  # seq ids whose KV to drop first
    copies: list[tuple[int, int, int]] = field(default_factory=list)  # (src, dst, n tokens)

    @property
    def n_tokens(self) -> int:
        return sum(c.end - c.start for c in self.chunks)


class Scheduler:
    def __init__(
        self,
        *,
        slots: int,
        n_batch: int,
        prefix_cache: PrefixCache | None = None,
        lookahead: int = 64,
    ) -> None:
        self.n_batch = n_batch
        self.free_seqs = list(range(slots))[::-1]
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.prefix_cache = prefix_cache
        self.lookahead = lookahead
        self._arrays: dict[int, np.ndarray] = {}
        # After a preemption, admit nothing until a request finishes: re-admitting the
        # victim at once would recreate the KV demand that just failed.
        self._hold_admission = False

    def add(self, req: Request) -> None:
        """Queue a request whose `tokens` hold its prompt."""
        req.status = Status.WAITING
        self.waiting.append(req)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Plan:
        plan = Plan()
        self._admit(plan)
        budget = self.n_batch
        for req in self.running:
            if req.num_pending == 1 and budget > 0:
                plan.chunks.append(Chunk(req, req.num_computed, req.num_computed + 1))
                budget -= 1
        owners: list[Owner] = []
        if self.prefix_cache is not None:
            owners.extend(self.prefix_cache.pending())
        owners.extend(r for r in self.running if r.num_pending > 1)
        for owner in owners:
            if budget <= 0:
                break
            n = min(len(owner.tokens) - owner.num_computed, budget)
            plan.chunks.append(Chunk(owner, owner.num_computed, owner.num_computed + n))
            budget -= n
        return plan

    def _admit(self, plan: Plan) -> None:
        if self.prefix_cache is not None:
            self.prefix_cache.begin_step()
        deferred: list[Request] = []
        while self.free_seqs and self.waiting and not self._hold_admission:
            req = self.waiting.popleft()
            if self.prefix_cache is not None and req.num_computed == 0:
                hit, evicted = self.prefix_cache.lookup(self._array(req), self._others(req))
                plan.evict.extend(evicted)
                if hit is not None and not hit.ready:
                    deferred.append(req)  # its prefix is being evaluated; join next step
                    continue
                seq = self.free_seqs.pop()
                if hit is not None:
                    plan.copies.append((hit.entry.seq_id, seq, hit.n))
                    req.num_computed = req.cached_tokens = hit.n
            else:
                seq = self.free_seqs.pop()
            req.seq_id = seq
            req.status = Status.RUNNING
            self.running.append(req)
        self.waiting.extendleft(reversed(deferred))

    def _array(self, req: Request) -> np.ndarray:
        arr = self._arrays.get(id(req))
        if arr is None:
            arr = self._arrays[id(req)] = np.asarray(req.tokens[: req.num_prompt], dtype=np.int32)
        return arr

    def _others(self, req: Request) -> Iterator[np.ndarray]:
        """Prompts that could share a prefix with `req`: running, and the next queued."""
        for r in self.running:
            yield self._array(r)
        for i, r in enumerate(self.waiting):
            if i >= self.lookahead:
                break
            yield self._array(r)

    def release(self, req: Request) -> None:
        """Return a finished request's slot (the engine has dropped its KV)."""
        self.running.remove(req)
        self.free_seqs.append(req.seq_id)
        self._hold_admission = False
        self._arrays.pop(id(req), None)

    def preempt(self) -> Request | None:
        """Under KV pressure: put the newest running request back at the head of the
        queue to be recomputed later. Returns it (the engine drops its KV), or None."""
        if len(self.running) <= 1:
            return None
        req = self.running.pop()
        self.free_seqs.append(req.seq_id)
        req.num_computed = 0
        req.cached_tokens = 0
        req.status = Status.WAITING
        self.waiting.appendleft(req)
        self._hold_admission = True
        return req
