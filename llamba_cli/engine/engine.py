"""Engine: continuous batching over one llama.cpp context.

    engine = Engine(EngineConfig(model_path="model.gguf", slots=16))
    for req in engine.run(Request(id=i, prompt=p) for i, p in enumerate(prompts)):
        print(req.id, req.text)

Every `step()` is one `llama_decode` carrying the next token of each running
sequence plus chunks of newly admitted prompts (never more than `n_batch`
tokens); a finished request frees its slot and KV at once and the next waiting
request takes it in the same step.  The engine does no file I/O and prints nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from llamba_cli.engine.config import EngineConfig
from llamba_cli.engine.labels import LabelScorer
from llamba_cli.engine.llama import Context, Grammar, Model
from llamba_cli.engine.prefix_cache import PrefixCache
from llamba_cli.engine.request import Request, Status
from llamba_cli.engine.runner import Runner, StepOutput
from llamba_cli.engine.sampler import sample
from llamba_cli.engine.scheduler import Chunk, Plan, Scheduler
from llamba_cli.engine.text import TextStream
from llamba_cli.errors import ConfigError, RowError

# Compiled grammars kept for cloning, by text; a job uses one, a library caller a few.
_GRAMMAR_CACHE = 8


@dataclass
class EngineStats:
    """Counters since the engine was built."""

    requests: int = 0
    prompt_tokens: int = 0  # prompt tokens of admitted requests
    prompt_tokens_evaluated: int = (
        0  # prompt tokens llama.cpp actually computed (prefixes included)
    )
    prompt_tokens_reused: int = 0  # prompt tokens taken from the prefix cache
    label_tokens_evaluated: int = 0  # label-branch tokens computed for classification
    generated_tokens: int = 0
    steps: int = 0
    decode_seconds: float = 0.0
    kv_retries: int = 0


class Engine:
    def __init__(self, config: EngineConfig, model: Model | None = None) -> None:
        self.config = config
        self.model = model or Model(
            config.model_path, n_gpu_layers=config.n_gpu_layers, repack=config.repack
        )
        n_seq = config.slots + config.prefix_slots
        self.ctx = Context(
            self.model,
            n_ctx=config.n_ctx,
            n_batch=config.n_batch,
            n_seq_max=n_seq,
            n_threads=config.n_threads,
            flash_attn=config.flash_attn,
        )
        cache = None
        if config.prefix_cache:
            cache = PrefixCache(
                range(config.slots, n_seq),
                budget=config.prefix_cache_tokens,
                min_tokens=config.prefix_min_tokens,
            )
        self.scheduler = Scheduler(
            slots=config.slots,
            n_batch=config.n_batch,
            prefix_cache=cache,
            lookahead=config.lookahead,
        )
        self.runner = Runner(self.ctx)
        self.stats = EngineStats()
        self._done: list[Request] = []
        self._grammars: dict[str, Grammar] = {}

    def close(self) -> None:
        for grammar in self._grammars.values():
            grammar.close()
        self._grammars.clear()
        self.ctx.close()

    # -- submitting ---------------------------------------------------------------

    def prepare(self, req: Request) -> None:
        """Tokenize `req` and set up its text stream / label scorer.

        Raises RowError when the request cannot run (empty or too-long prompt, a label
        with no tokens after the prompt, a grammar llama.cpp cannot parse)."""
        ptoks = self.model.tokenize(req.prompt)
        limit = self.config.n_ctx_seq
        if not ptoks:
            raise RowError("empty prompt")
        if req.labels is not None:
            ptoks, label_tokens = self._label_tokens(req, ptoks)
            req.scorer = LabelScorer(label_tokens)
            longest = len(ptoks) + max(len(t) for t in label_tokens) - 1
            if longest > limit:
                raise RowError(
                    f"prompt and labels need {longest} tokens; "
                    f"a sequence holds at most {limit} (--ctx)"
                )
        elif len(ptoks) >= limit:
            raise RowError(
                f"prompt has {len(ptoks)} tokens; a sequence holds at most {limit} "
                "including the completion (--ctx)"
            )
        req.tokens = ptoks
        req.num_prompt = len(ptoks)
        req.stream = TextStream(req.params.stop)
        req.rng = np.random.default_rng(req.params.seed)
        if req.grammar_text is not None:
            if req.labels is not None:
                raise RowError("a grammar applies to generation, not to classification")
            req.grammar = self._grammar(req.grammar_text).clone()

    def _grammar(self, text: str) -> Grammar:
        """The compiled grammar for `text` (parsed once, then cloned per request)."""
        compiled = self._grammars.get(text)
        if compiled is None:
            try:
                compiled = Grammar(self.model, text)
            except ConfigError as e:
                raise RowError(str(e)) from None
            if len(self._grammars) >= _GRAMMAR_CACHE:
                oldest = next(iter(self._grammars))
                self._grammars.pop(oldest).close()
            self._grammars[text] = compiled
        return compiled

    def _label_tokens(self, req: Request, ptoks: list[int]) -> tuple[list[int], list[list[int]]]:
        """Context tokens and each label's tokens *as they follow the prompt*.

        Labels are tokenized together with the prompt, never standalone; if the
        tokenizer merges across the boundary the context is cut to the part every
        labelled text shares, so each score stays exact."""
        assert req.labels is not None
        delim = "" if not req.prompt or req.prompt[-1].isspace() else req.label_delimiter
        fulls = [self.model.tokenize(req.prompt + delim + label) for label in req.labels]
        ctx_len = len(ptoks)
        for full in fulls:
            n = 0
            for a, b in zip(ptoks, full, strict=False):
                if a != b:
                    break
                n += 1
            ctx_len = min(ctx_len, n, len(full) - 1)
        for label, full in zip(req.labels, fulls, strict=True):
            if len(full) <= len(ptoks) and full[: len(ptoks)] == ptoks:
                raise RowError(f"label {label!r} adds no tokens after this prompt")
        if ctx_len < 1:
            raise RowError("prompt is empty once labels are joined to it")
        return ptoks[:ctx_len], [full[ctx_len:] for full in fulls]

    def submit(self, req: Request) -> None:
        """Queue a request. One that cannot run finishes at once with an error, and one
        that arrives already finished (the caller's own error row) passes through; both
        are returned by the next `step()`, so callers see every request come back."""
        if req.finished:
            self._done.append(req)
            return
        self.stats.requests += 1
        try:
            self.prepare(req)
        except RowError as e:
            req.finish("error", str(e))
            self._done.append(req)
            return
        self.scheduler.add(req)

    @property
    def has_work(self) -> bool:
        return bool(self._done) or self.scheduler.has_work

    def run(self, requests: Iterable[Request]) -> Iterator[Request]:
        """Submit `requests` lazily (keeping `lookahead` queued, so memory does not grow
        with the input) and yield each one as it finishes, in completion order."""
        it = iter(requests)
        exhausted = False
        while True:
            while not exhausted and len(self.scheduler.waiting) < self.config.lookahead:
                nxt = next(it, None)
                if nxt is None:
                    exhausted = True
                else:
                    self.submit(nxt)
            if not self.has_work:
                if exhausted:
                    return
                continue
            yield from self.step()

    # -- stepping -----------------------------------------------------------------

    def step(self) -> list[Request]:
        """One decode. Returns the requests that finished."""
        while self.scheduler.has_work:
            plan = self.scheduler.schedule()
            self.runner.apply_kv_ops(plan)
            if not plan.chunks:
                break
            t0 = time.perf_counter()
            out = self.runner.run(plan.chunks)
            self.stats.decode_seconds += time.perf_counter() - t0
            if out is not None:
                self.stats.steps += 1
                self._postprocess(plan, out)
                break
            self._relieve_kv_pressure()
        done, self._done = self._done, []
        return done

    def _relieve_kv_pressure(self) -> None:
        """No KV room for the batch: drop cached prefixes, then preempt the newest
        request (recomputed later). A lone request that cannot fit ends in error."""
        self.stats.kv_retries += 1
        cache = self.scheduler.prefix_cache
        if cache is not None and cache.entries:
            for seq in cache.evict_all():
                self.ctx.seq_rm(seq)
            return
        victim = self.scheduler.preempt()
        if victim is not None:
            self.ctx.seq_rm(victim.seq_id)
            return
        for req in list(self.scheduler.running):
            self._finish(
                req, "error", "sequence does not fit in the KV cache (lower --slots or raise --ctx)"
            )

    def _postprocess(self, plan: Plan, out: StepOutput) -> None:
        gen_reqs: list[Request] = []
        gen_rows: list[int] = []
        for chunk, rows in zip(plan.chunks, out.rows, strict=True):
            owner = chunk.owner
            owner.num_computed = chunk.end
            if not isinstance(owner, Request):  # a shared prefix being evaluated
                self.stats.prompt_tokens_evaluated += chunk.end - chunk.start
                continue
            self._count(owner, chunk)
            if owner.scorer is not None:
                self._score(owner, chunk, rows, out.logits)
            elif chunk.end == len(owner.tokens):
                gen_reqs.append(owner)
                gen_rows.append(rows[-1][1])
        for req, tok in zip(gen_reqs, sample(out.logits, gen_rows, gen_reqs), strict=True):
            self._accept(req, tok)

    def _count(self, req: Request, chunk: Chunk) -> None:
        s = self.stats
        if chunk.start < req.num_prompt:
            s.prompt_tokens_evaluated += min(chunk.end, req.num_prompt) - chunk.start
            if chunk.start == req.cached_tokens:  # first chunk of this admission
                s.prompt_tokens += req.num_prompt
                s.prompt_tokens_reused += req.cached_tokens
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
            self.ctx.seq_rm(req.seq_id, cut, -1)
        req.tokens = req.tokens[:cut] + branch
        req.num_computed = cut
        req.score_from = cut

    def _accept(self, req: Request, tok: int) -> None:
        p = req.params
        if tok < 0:  # the sampler found no token the request's grammar allows
            self._finish(req, "error", "the grammar allows no next token")
            return
        if self.model.eog_mask[tok] and not p.ignore_eos:
            self._finish(req, "stop")
            return
        if req.grammar is not None and not self.model.eog_mask[tok]:
            req.grammar.accept(tok)
        req.tokens.append(tok)
        req.completion_tokens += 1
        self.stats.generated_tokens += 1
        assert req.stream is not None
        if req.stream.feed(self.model.piece(tok)):
            self._finish(req, "stop")
        elif req.completion_tokens >= p.max_tokens or len(req.tokens) >= self.config.n_ctx_seq:
            self._finish(req, "length")

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        if req.grammar is not None:
            # End-of-generation is sampled only where the grammar is complete; a stop
            # string, max_tokens or the context can cut the output anywhere.
            if error is None and reason != "error" and not req.grammar.complete():
                error = _incomplete(req, reason)
            req.grammar.close()
            req.grammar = None
        if req.status is Status.RUNNING:
            self.ctx.seq_rm(req.seq_id)
            self.scheduler.release(req)
        req.finish(reason, error)
        self._done.append(req)


def _incomplete(req: Request, reason: str) -> str:
    """Why a constrained request ended (`reason` "stop" or "length") before its output
    completed the grammar.  End-of-generation is allowed only on completion, so an
    incomplete "stop" was a stop string."""
    if reason == "stop":
        return "a stop string ended the output before it completed the grammar"
    if req.completion_tokens >= req.params.max_tokens:
        return "output did not complete the grammar within max-tokens"
    return "output did not complete the grammar before the sequence filled its context"
