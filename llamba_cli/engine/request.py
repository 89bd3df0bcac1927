"""`Request`: the one object that carries a row through the engine.

Created by the caller (the job layer, a server, a Ray actor), submitted to the
`Engine`, scheduled, run, sampled, and handed back finished with its result
fields set.  The scheduler's invariant, borrowed from vLLM: every step, each
running request's *computed* tokens (KV in its sequence) catch up with its *known*
tokens; a generated token or a label branch just makes more tokens known.  There is
no separate prefill or decode mode.

What a request produced comes back from every `Engine.step` as a `RequestOutput`:
the tokens, text and logprobs new since the last one, and finally `finished`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from llamba_cli.engine.config import SamplingParams
from llamba_cli.engine.labels import LabelScorer
from llamba_cli.engine.text import TextStream

if TYPE_CHECKING:
    from llamba_cli.engine.grammar import Grammar


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    """One generated token's log-probability and its top alternatives (highest first).

    Log-softmax of the logits row the token was sampled from, after logit bias and
    before penalties, grammar and the sampling chain: the model's own distribution.
    `text` is the token's piece (bytes: a character may span tokens).
    """

    token: int
    text: bytes
    logprob: float
    top: list[tuple[int, bytes, float]] = field(default_factory=list)


@dataclass(eq=False)
class Request:
    """A generation (or, with `labels`, a classification) request.

    Inputs: `id` (any caller key), `prompt` (text, tokenized by the engine with the
    model's BOS rule and special tokens parsed), `params`, `labels` (label texts to
    score as continuations of the prompt, `label_delimiter` joining them), `sample`
    (a caller tag, e.g. which of n samples), `grammar_text` (GBNF, start symbol
    `root`: every generated token keeps the output a prefix of the grammar's language,
    and the request ends by end-of-generation only once the output is complete),
    `tag` (opaque caller data, never read by the engine), `deadline` (a
    `time.monotonic()` instant: a request still queued or running then ends with
    finish_reason "abort" and error "deadline exceeded").

    Results, set when `status` is FINISHED: `text`, `finish_reason` ("stop",
    "length", "error" or "abort"), `error`, `prompt_tokens`, `completion_tokens`,
    `cached_tokens` (prompt tokens reused from the prefix cache), `logprobs` (one
    `TokenLogprob` per generated token when `params.logprobs` is set), and for
    classification `label_logprobs` (log P(label | prompt), summed over the label's
    tokens, in label order).  A constrained request that stops short of completing
    its grammar (length, context, stop string) also gets an `error`.
    """

    id: Any
    prompt: str
    params: SamplingParams = field(default_factory=SamplingParams)
    labels: tuple[str, ...] | None = None
    label_delimiter: str = " "
    sample: int = 0
    grammar_text: str | None = None
    tag: Any = None
    deadline: float | None = None

    # -- engine state -------------------------------------------------------------
    status: Status = Status.WAITING
    seq_id: int = -1
    tokens: list[int] = field(default_factory=list)  # known tokens: prompt (+ generated/branch)
    num_prompt: int = 0
    num_computed: int = 0  # tokens whose KV is in this request's sequence
    cached_tokens: int = 0
    score_from: int = -1  # positions >= this also want logits (label branches); -1 = none
    stream: TextStream | None = None
    scorer: LabelScorer | None = None
    rng: np.random.Generator | None = None
    grammar: Grammar | None = None  # this request's own parse state; freed when it finishes
    num_reported: int = 0  # generated tokens (and logprobs) already handed out in outputs

    # -- results ------------------------------------------------------------------
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    label_logprobs: list[float] | None = None

    @property
    def prompt_tokens(self) -> int:
        return self.num_prompt

    @property
    def num_pending(self) -> int:
        return len(self.tokens) - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def wants_logits(self, pos: int) -> bool:
        """Whether the token at `pos` needs an output row when it is computed."""
        return pos == len(self.tokens) - 1 or 0 <= self.score_from <= pos

    def generated(self) -> list[int]:
        return self.tokens[self.num_prompt :]

    def finish(self, reason: str, error: str | None = None) -> None:
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.error = error
        if self.stream is not None:
            self.text = self.stream.close()

    def take_output(self) -> RequestOutput:
        """What this request produced since its last output (and whether it is done)."""
        start = self.num_prompt + self.num_reported
        end = self.num_prompt + self.completion_tokens
        lps = None
        if self.logprobs is not None:
            lps = self.logprobs[self.num_reported : self.completion_tokens]
        self.num_reported = self.completion_tokens
        return RequestOutput(
            request=self,
            token_ids=self.tokens[start:end],
            text=self.stream.take() if self.stream is not None else "",
            logprobs=lps,
            finished=self.finished,
        )


@dataclass
class RequestOutput:
    """What one request produced in one step.

    `token_ids`, `text` and `logprobs` are new since the request's previous output.
    `text` is UTF-8 safe and never holds a stop string or a part of one: text that
    may still turn out to begin a stop string is held back until it cannot, so a
    request's `text` deltas concatenated equal its final `request.text`.  `finished`:
    this is the request's last output, and its result fields (`finish_reason`, ...)
    are set.
    """

    request: Request
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None
    finished: bool
