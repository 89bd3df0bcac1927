"""Engine: continuous batching over one llama.cpp context.

    engine = Engine(EngineConfig(model_path="model.gguf", slots=16))
    for req in engine.run(Request(id=i, prompt=p) for i, p in enumerate(prompts)):
        print(req.id, req.text)

Every `step()` is one `llama_decode` carrying the next token of each running
sequence plus chunks of newly admitted prompts (never more than `n_batch`
tokens); it returns a `RequestOutput` for every request that produced something or
finished.  A finished request frees its slot and KV at once and the next waiting
request takes it in the next step.  The scheduler plans and applies each step's
results (the finishing rules live there), the runner owns the KV memory and the
decode; the engine tokenizes and ties them together.  It does no file I/O and
prints nothing, and it is not thread-safe: `EngineLoop` (`front.py`) runs it on a
thread of its own for callers on any thread.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import numpy as np
import numpy.random  # here, not at the first request (8 ms): see `prepare`

from llamba_cli.engine.config import EngineConfig
from llamba_cli.engine.grammar import Grammar
from llamba_cli.engine.labels import LabelScorer
from llamba_cli.engine.llama import Context, Model
from llamba_cli.engine.prefix_cache import PrefixCache
from llamba_cli.engine.request import Request, RequestOutput
from llamba_cli.engine.runner import Runner
from llamba_cli.engine.scheduler import EngineStats, Scheduler
from llamba_cli.engine.text import TextStream
from llamba_cli.errors import ConfigError, RowError

__all__ = ["Engine", "EngineStats"]

# Compiled grammars kept for cloning, by text; a job uses one, a library caller a few.
_GRAMMAR_CACHE = 8

_END = object()


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
        self.stats = EngineStats()
        self.scheduler = Scheduler(
            slots=config.slots,
            n_batch=config.n_batch,
            n_ctx_seq=config.n_ctx_seq,
            vocab=self.model,
            prefix_cache=cache,
            lookahead=config.lookahead,
            stats=self.stats,
        )
        self.runner = Runner(self.ctx, self.stats)
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
        # numpy.random is imported with this module: a job imports it beside the
        # model's load, where its first use would sit between the load and the first
        # decode.
        req.rng = np.random.default_rng(req.params.seed)
        req.logprobs = [] if req.params.logprobs is not None else None
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
        come back from the next `step()`, so callers see every request come back."""
        if not req.finished:
            self.stats.requests += 1
            try:
                self.prepare(req)
            except RowError as e:
                req.finish("error", str(e))
        if req.finished:
            self.scheduler.done(req)
        else:
            self.scheduler.add(req)

    def abort(self, req: Request) -> bool:
        """End `req` (queued or running) with finish_reason "abort": its slot and KV are
        free at the next step, which returns it finished; no other request is
        disturbed.  False when it is not queued or running (e.g. already finished)."""
        return self.scheduler.abort(req)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def run(self, requests: Iterable[Request]) -> Iterator[Request]:
        """Submit `requests` lazily and yield each one as it finishes, in completion
        order.  At most `lookahead` requests are queued or finished-but-not-yielded at
        a time, so memory does not grow with the input (a run of error rows included)."""
        it = iter(requests)
        exhausted = False
        while True:
            sched = self.scheduler
            while not exhausted and len(sched.waiting) + sched.num_outputs < self.config.lookahead:
                nxt = next(it, _END)
                if nxt is _END:
                    exhausted = True
                elif isinstance(nxt, Request):
                    self.submit(nxt)
                else:
                    raise TypeError(f"Engine.run takes Request objects, got {type(nxt).__name__}")
            if not self.has_work:
                if exhausted:
                    return
                continue
            for out in self.step():
                if out.finished:
                    yield out.request

    def step(self) -> list[RequestOutput]:
        """One decode (or none when no request runs). Returns an output for every
        request that produced tokens or finished, including requests that finished
        outside a decode (errors at submit, aborts, deadlines)."""
        sched = self.scheduler
        sched.expire(time.monotonic())
        plan = sched.schedule()
        out = self.runner.run(plan)
        if out is None:
            sched.relieve()  # no KV room: the next step plans again
        elif plan.chunks:
            self.stats.steps += 1
            sched.postprocess(plan, out)
        return sched.take_outputs()
