"""Scheduler: which tokens go into the next `llama_decode`, and what a step's results do.

A fixed pool of `slots` sequence ids.  `schedule()` plans each step:
1. refill free slots from the waiting queue at once (taking cached prefix KV when the
   prefix cache has it, or deferring a request for a step while its shared prefix is
   being evaluated);
2. give every running request with exactly one pending token (a decode) its token;
3. fill the rest of the `n_batch` budget with chunks of pending prefixes and
   prompts, oldest first.

`postprocess()` applies a step's results, and is the one home of the finishing
rules: end-of-generation, stop strings, `max_tokens`, the sequence's context, a
grammar left incomplete, a classification whose labels are all scored.  Requests
also end by `abort()`, `expire()` (deadlines) and `relieve()` (no KV room even
alone).  Every request that produced something or finished leaves a
`RequestOutput`, collected by `take_outputs()`.

It never touches llama.cpp: the KV operations its decisions need (drop a finished
sequence, rewind a label branch, share or evict a cached prefix) travel in the next
`Plan`, and the runner applies them before decoding.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from llamba_cli.engine.prefix_cache import PrefixCache
from llamba_cli.engine.request import Request, RequestOutput, Status, TokenLogprob
from llamba_cli.engine.sampler import Draw


class Owner(Protocol):
    """What a chunk is cut from: a `Request` or a `PrefixEntry`."""

    seq_id: int
    tokens: list[int]
    num_computed: int
    score_from: int

    def wants_logits(self, pos: int) -> bool: ...


class Vocab(Protocol):
    """What the finishing rules need to know about tokens (a `Model` is one)."""

    eog_mask: np.ndarray

    def piece(self, token: int) -> bytes: ...


@dataclass
class Chunk:
    owner: Owner
    start: int
    end: int
    sample: bool = False  # a generation request's last known token: draw the next one


@dataclass
class Plan:
    """One step: KV operations to apply in this order, then the chunks to decode."""

    chunks: list[Chunk] = field(default_factory=list)
    trim: list[tuple[int, int]] = field(default_factory=list)  # (seq, from pos): label rewinds
    free: list[int] = field(default_factory=list)  # sequences of finished or preempted requests
    copies: list[tuple[int, int, int]] = field(default_factory=list)  # (src, dst, n tokens)
    evict: list[int] = field(default_factory=list)  # prefix-cache sequences

    @property
    def n_tokens(self) -> int:
        return sum(c.end - c.start for c in self.chunks)


@dataclass
class StepOutput:
    """A decoded plan: logits rows and the tokens drawn from them."""

    logits: np.ndarray  # [n_outputs, n_vocab], valid until the next decode
    rows: list[list[tuple[int, int]]]  # per chunk: (position, logits row) pairs
    draws: list[Draw | None]  # per chunk: the token drawn when `chunk.sample`


@dataclass
class EngineStats:
    """Counters since the engine was built."""

    requests: int = 0
    prompt_tokens: int = 0  # prompt tokens of queued requests, once each
    prompt_tokens_evaluated: int = 0  # prompt tokens llama.cpp computed (prefixes included)
    prompt_tokens_reused: int = 0  # prompt tokens taken from the prefix cache
    label_tokens_evaluated: int = 0  # label-branch tokens computed for classification
    generated_tokens: int = 0
    steps: int = 0
    decode_seconds: float = 0.0  # inside llama_decode
    kv_retries: int = 0  # decodes that found no KV room


NO_ROOM = "sequence does not fit in the KV cache (lower --slots or raise --ctx)"


class Scheduler:
    def __init__(
        self,
        *,
        slots: int,
        n_batch: int,
        n_ctx_seq: int,
        vocab: Vocab,
        prefix_cache: PrefixCache | None = None,
        lookahead: int = 64,
        stats: EngineStats | None = None,
    ) -> None:
        self.n_batch = n_batch
        self.n_ctx_seq = n_ctx_seq
        self.vocab = vocab
        self.free_seqs = list(range(slots))[::-1]
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.prefix_cache = prefix_cache
        self.lookahead = lookahead
        self.stats = stats if stats is not None else EngineStats()
        self._arrays: dict[int, np.ndarray] = {}
        self._timed: set[Request] = set()  # queued or running requests with a deadline
        self._outputs: list[RequestOutput] = []
        self._trim: list[tuple[int, int]] = []
        self._free: list[int] = []
        # After a preemption, admit nothing until a request finishes: re-admitting the
        # victim at once would recreate the KV demand that just failed.
        self._hold_admission = False

    # -- the queue --------------------------------------------------------------------

    def add(self, req: Request) -> None:
        """Queue a request whose `tokens` hold its prompt."""
        req.status = Status.WAITING
        self.waiting.append(req)
        self.stats.prompt_tokens += req.num_prompt
        if req.deadline is not None:
            self._timed.add(req)

    def done(self, req: Request) -> None:
        """Report a request that finished before it was queued (an error row)."""
        self._outputs.append(req.take_output())

    def abort(self, req: Request, error: str | None = None) -> bool:
        """End a queued or running request now (finish_reason "abort"); its slot and
        KV are free for the next step. False if it is neither."""
        if req.status is Status.RUNNING and req in self.running:
            self._finish(req, "abort", error)
        elif req.status is Status.WAITING and req in self.waiting:
            self.waiting.remove(req)
            self._finish(req, "abort", error)
        else:
            return False
        return True

    def expire(self, now: float) -> None:
        """Abort every queued or running request whose deadline is past."""
        for req in [r for r in self._timed if r.deadline is not None and r.deadline <= now]:
            self.abort(req, "deadline exceeded")

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._outputs or self._free)

    @property
    def num_outputs(self) -> int:
        return len(self._outputs)

    def take_outputs(self) -> list[RequestOutput]:
        out, self._outputs = self._outputs, []
        return out

    # -- planning ---------------------------------------------------------------------

    def schedule(self) -> Plan:
        plan = Plan(trim=self._trim, free=self._free)
        self._trim, self._free = [], []
        self._admit(plan)
        budget = self.n_batch
        for req in self.running:
            if req.num_pending == 1 and budget > 0:
                plan.chunks.append(self._chunk(req, req.num_computed + 1))
                budget -= 1
        owners: list[Owner] = []
        if self.prefix_cache is not None:
            owners.extend(self.prefix_cache.pending())
        owners.extend(r for r in self.running if r.num_pending > 1)
        for owner in owners:
            if budget <= 0:
                break
            n = min(len(owner.tokens) - owner.num_computed, budget)
            plan.chunks.append(self._chunk(owner, owner.num_computed + n))
            budget -= n
        return plan

    @staticmethod
    def _chunk(owner: Owner, end: int) -> Chunk:
        sample = isinstance(owner, Request) and owner.scorer is None and end == len(owner.tokens)
        return Chunk(owner, owner.num_computed, end, sample)

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
                    self.stats.prompt_tokens_reused += hit.n
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

    # -- KV pressure ------------------------------------------------------------------

    def relieve(self) -> None:
        """The last plan found no KV room (llama.cpp applied none of it).  Free some
        for the next step, each time a different way, so no plan fails forever: drop
        the cached prefixes (and make no new ones until a request finishes); else put
        the newest running request back in the queue, to be recomputed later; else the
        one request left cannot fit at all and ends in error."""
        self.stats.kv_retries += 1
        cache = self.prefix_cache
        if cache is not None and cache.entries:
            self._free.extend(cache.evict_all())
            return
        if self.preempt() is None:
            for req in list(self.running):
                self._finish(req, "error", NO_ROOM)

    def preempt(self) -> Request | None:
        """Put the newest running request back at the head of the queue (its KV is
        dropped before the next decode). Returns it, or None if one or none runs."""
        if len(self.running) <= 1:
            return None
        req = self.running.pop()
        self.free_seqs.append(req.seq_id)
        self._free.append(req.seq_id)
        req.num_computed = 0
        req.cached_tokens = 0
        req.status = Status.WAITING
        self.waiting.appendleft(req)
        self._hold_admission = True
        return req

    # -- results ----------------------------------------------------------------------

    def postprocess(self, plan: Plan, out: StepOutput) -> None:
        """Apply a decoded plan: computed tokens, label scores, drawn tokens; finish
        the requests whose rules say so and collect every request's output."""
        for chunk, rows, drawn in zip(plan.chunks, out.rows, out.draws, strict=True):
            owner = chunk.owner
            owner.num_computed = chunk.end
            if not isinstance(owner, Request):  # a shared prefix being evaluated
                self.stats.prompt_tokens_evaluated += chunk.end - chunk.start
                continue
            self._count(owner, chunk)
            if owner.scorer is not None:
                self._score(owner, chunk, rows, out.logits)
            elif drawn is not None:
                self._accept(owner, drawn)

    def _count(self, req: Request, chunk: Chunk) -> None:
        s = self.stats
        if chunk.start < req.num_prompt:
            s.prompt_tokens_evaluated += min(chunk.end, req.num_prompt) - chunk.start
        if req.scorer is not None and chunk.end > req.num_prompt:
            s.label_tokens_evaluated += chunk.end - max(chunk.start, req.num_prompt)

    def _score(
        self, req: Request, chunk: Chunk, rows: list[tuple[int, int]], logits: np.ndarray
    ) -> None:
        assert req.scorer is not None
        ctx_len = req.num_prompt
        for pos, row in rows:
            req.scorer.observe(tuple(req.tokens[ctx_len : pos + 1]), logits[row])
        if chunk.end < len(req.tokens):
            return
        nxt = req.scorer.next_path()
        if nxt is None:
            req.label_logprobs = req.scorer.logprobs()
            self._finish(req, "stop")
            return
        keep, branch = nxt
        cut = ctx_len + keep
        if cut < req.num_computed:
            self._trim.append((req.seq_id, cut))
        req.tokens = req.tokens[:cut] + branch
        req.num_computed = cut
        req.score_from = cut

    def _accept(self, req: Request, drawn: Draw) -> None:
        p = req.params
        tok = drawn.token
        if tok < 0:  # the sampler found no token the request's grammar allows
            self._finish(req, "error", "the grammar allows no next token")
            return
        eog = bool(self.vocab.eog_mask[tok])
        if eog and not p.ignore_eos:
            self._finish(req, "stop")
            return
        if req.grammar is not None and not eog:
            req.grammar.accept(tok)
        piece = self.vocab.piece(tok)
        req.tokens.append(tok)
        req.completion_tokens += 1
        self.stats.generated_tokens += 1
        if req.logprobs is not None and drawn.logprob is not None:
            top = [(t, self.vocab.piece(t), lp) for t, lp in drawn.top or ()]
            req.logprobs.append(TokenLogprob(tok, piece, drawn.logprob, top))
        assert req.stream is not None
        if req.stream.feed(piece):
            self._finish(req, "stop")
        elif req.completion_tokens >= p.max_tokens or len(req.tokens) >= self.n_ctx_seq:
            self._finish(req, "length")
        else:
            self._outputs.append(req.take_output())

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        if req.grammar is not None:
            # End-of-generation is sampled only where the grammar is complete; a stop
            # string, max_tokens or the context can cut the output anywhere.
            if error is None and reason in ("stop", "length") and not req.grammar.complete():
                error = _incomplete(req, reason)
            req.grammar.close()
            req.grammar = None
        if req.status is Status.RUNNING:
            self.running.remove(req)
            self.free_seqs.append(req.seq_id)
            self._free.append(req.seq_id)
            self._hold_admission = False
            if self.prefix_cache is not None:
                self.prefix_cache.suspended = False
        self._arrays.pop(id(req), None)
        self._timed.discard(req)
        req.finish(reason, error)
        self._outputs.append(req.take_output())


def _incomplete(req: Request, reason: str) -> str:
    """Why a constrained request ended (`reason` "stop" or "length") before its output
    completed the grammar.  End-of-generation is allowed only on completion, so an
    incomplete "stop" was a stop string."""
    if reason == "stop":
        return "a stop string ended the output before it completed the grammar"
    if req.completion_tokens >= req.params.max_tokens:
        return "output did not complete the grammar within max-tokens"
    return "output did not complete the grammar before the sequence filled its context"
