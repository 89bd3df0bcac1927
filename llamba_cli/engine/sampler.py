"""Vectorized sampling over all rows of a step.

Semantics follow llama.cpp's default sampler chain: logit bias, penalties, then
top-k, top-p and min-p on the *untempered* distribution, then temperature over the
survivors.  temperature 0 is argmax.

Speed at a 262,144-token vocabulary: a [32, V] float32 block is 32 MiB, a full
softmax over it ~27 ms and a top-k partition ~57 ms, against a ~190 ms decode step.
So nothing here sorts or exponentiates the vocabulary: each row is first cut to the
tokens within reach of its maximum (`max - 30 * max(T, 1)`: everything below has
relative probability < e^-30, and min-p tightens the cut), and the chain runs on
those few candidates.

Logprobs, when a request asks, are the log-softmax of its row after logit bias and
before penalties (the model's distribution, as OpenAI and llama-server report it),
computed from the same row the token is drawn from, without changing the draw.

Constrained requests (a grammar) follow llama.cpp's common sampler: the usual chain
draws a token, and only that token is checked against the grammar.  Only when it is
rejected does the grammar look at more of the row, never the whole vocabulary at
once: the tokens whose first byte it allows when they are few, else the row's top
candidates; the chain draws again from the tokens it allows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from llamba_cli.engine.request import Request

if TYPE_CHECKING:
    from llamba_cli.engine.grammar import Grammar

# Tokens more than this many (tempered) nats below the row's max are dropped
# before any sort: their total mass is < V * e^-30 ~ 3e-8 of the top token's.
_REACH = 30.0

# When the chain's draw is rejected and many tokens could follow, the grammar is
# asked about about this many of the row's highest logits before anything else.
GRAMMAR_CANDIDATES = 2048


@dataclass
class Draw:
    """A sampled token; with its logprob and top alternatives when the request asked."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


def apply_bias_and_penalties(
    logits: np.ndarray, rows: Sequence[int], reqs: Sequence[Request]
) -> None:
    """In place: logit bias, then repetition/presence/frequency penalties over each
    request's last `repeat_last_n` generated tokens (llama.cpp semantics)."""
    apply_bias(logits, rows, reqs)
    apply_penalties(logits, rows, reqs)


def apply_bias(logits: np.ndarray, rows: Sequence[int], reqs: Sequence[Request]) -> None:
    """In place: each request's logit bias (OpenAI semantics; -inf bans a token)."""
    for row, req in zip(rows, reqs, strict=True):
        p = req.params
        if p.logit_bias:
            toks = np.fromiter((t for t, _ in p.logit_bias), dtype=np.int64)
            bias = np.fromiter((b for _, b in p.logit_bias), dtype=np.float32)
            ok = toks < logits.shape[1]
            logits[row, toks[ok]] += bias[ok]


def apply_penalties(logits: np.ndarray, rows: Sequence[int], reqs: Sequence[Request]) -> None:
    """In place: repetition, presence and frequency penalties (llama.cpp semantics)."""
    for row, req in zip(rows, reqs, strict=True):
        p = req.params
        if p.penalized:
            recent = req.generated()[-p.repeat_last_n :]
            if not recent:
                continue
            toks, counts = np.unique(np.asarray(recent, dtype=np.int64), return_counts=True)
            x = logits[row, toks]
            if p.repeat_penalty != 1.0:
                x = np.where(x > 0, x / p.repeat_penalty, x * p.repeat_penalty)
            x = x - (p.presence_penalty + p.frequency_penalty * counts).astype(np.float32)
            logits[row, toks] = x


class _Distribution:
    """log-softmax of one row as it is now: the normalizer and the `k` most likely
    tokens at once, any other token's logprob later (from a copy of the row when
    penalties are about to change it in place)."""

    def __init__(self, row: np.ndarray, k: int, keep_copy: bool) -> None:
        m = float(row.max())
        self.lse = m + math.log(float(np.exp(row - m, dtype=np.float64).sum()))
        self.row = row.copy() if keep_copy else row
        self.top: list[tuple[int, float]] = []
        if k > 0:
            cand = np.flatnonzero(row >= m - 20.0)
            if len(cand) < k:
                cand = np.argpartition(row, len(row) - k)[len(row) - k :]
            order = np.lexsort((cand, -row[cand]))[:k]  # highest first, ties by id
            ids = cand[order]
            self.top = [(int(t), float(row[t]) - self.lse) for t in ids]

    def draw(self, token: int) -> Draw:
        return Draw(token, float(self.row[token]) - self.lse, self.top)


def draw(logits: np.ndarray, rows: Sequence[int], reqs: Sequence[Request]) -> list[Draw]:
    """One next token per request, with logprobs for requests that ask. `rows[i]` is
    request i's row in `logits`, which may be modified in place (it is llama.cpp's
    output buffer, rewritten next step)."""
    if not reqs:
        return []
    apply_bias(logits, rows, reqs)
    dists = {
        i: _Distribution(logits[rows[i]], req.params.logprobs, req.params.penalized)
        for i, req in enumerate(reqs)
        if req.params.logprobs is not None
    }
    apply_penalties(logits, rows, reqs)
    tokens = _tokens(logits, rows, reqs)
    return [dists[i].draw(t) if i in dists and t >= 0 else Draw(t) for i, t in enumerate(tokens)]


def sample(logits: np.ndarray, rows: Sequence[int], reqs: Sequence[Request]) -> list[int]:
    """One next token per request (`draw` without logprobs)."""
    return [d.token for d in draw(logits, rows, reqs)]


def _top_k_candidates(row: np.ndarray, m: float, k: int, reach: float) -> np.ndarray:
    """Indices of the `k` largest logits (all within `reach` of the max if k == 0)."""
    if k > 0:
        # A tight cut usually holds k tokens already, and then it holds the top k.
        cand = np.flatnonzero(row >= m - 10.0)
        if len(cand) < k:
            cand = np.flatnonzero(row >= m - reach)
        if len(cand) > k:
            cand = cand[np.argpartition(-row[cand], k - 1)[:k]]
        return cand
    return np.flatnonzero(row >= m - reach)


def _top_p_prefix(cand: np.ndarray, w: np.ndarray, mass: float) -> np.ndarray:
    """The fewest highest-weight candidates whose weights reach `mass`."""
    if len(cand) > 1024:
        # Sort only the heaviest 1024 when they already reach the mass (the usual case).
        top = np.argpartition(-w, 1023)[:1024]
        if w[top].sum() >= mass:
            cand, w = cand[top], w[top]
    order = np.argsort(-w, kind="stable")
    n = int(np.searchsorted(np.cumsum(w[order]), mass)) + 1
    return cand[order[:n]]


def sample_row(row: np.ndarray, req: Request, m: float) -> int:
    """Draw one token from one row of logits (max `m`) with the request's generator.

    llama.cpp's order: top-k, then top-p over the top-k survivors' softmax, then min-p
    (relative to the max), all on untempered logits; then temperature.  Top-p and
    min-p each keep a prefix of the sorted survivors, so the result is the shorter
    prefix, and only that part is ever sorted.
    """
    p = req.params
    t = p.temperature
    cand = _top_k_candidates(row, m, p.top_k, _REACH * max(t, 1.0))
    if p.min_p > 0 or p.top_p < 1.0:
        vals = row[cand].astype(np.float64)
        w = np.exp(vals - m)  # untempered weights, max 1
    if p.min_p > 0:
        inside = vals >= m + math.log(p.min_p)
        if p.top_p < 1.0 and w[inside].sum() >= p.top_p * w.sum():
            cand = _top_p_prefix(cand[inside], w[inside], p.top_p * w.sum())
        else:
            cand = cand[inside]
    elif p.top_p < 1.0:
        cand = _top_p_prefix(cand, w, p.top_p * w.sum())
    # float32 exponent (values <= 0), float64 running sum for the draw.
    tw = np.exp((row[cand] - np.float32(m)) * np.float32(1.0 / t))
    cum = np.cumsum(tw, dtype=np.float64)
    assert req.rng is not None
    u = req.rng.random() * float(cum[-1])
    i = min(int(np.searchsorted(cum, u, side="right")), len(cand) - 1)
    return int(cand[i])


def _tokens(logits: np.ndarray, rows: Sequence[int], reqs: Sequence[Request]) -> list[int]:
    """The chain's draw for every row (bias and penalties already applied)."""
    out = [0] * len(reqs)
    greedy = [i for i, r in enumerate(reqs) if r.params.greedy]
    if greedy:
        g_rows = [rows[i] for i in greedy]
        lo, hi = g_rows[0], g_rows[-1] + 1
        # A contiguous run of rows is a view; anything else would copy 1 MiB a row.
        block = logits[lo:hi] if g_rows == list(range(lo, hi)) else logits[g_rows]
        for i, tok in zip(greedy, block.argmax(axis=1).tolist(), strict=True):
            out[i] = tok
    for i, req in enumerate(reqs):
        if not req.params.greedy:
            row = logits[rows[i]]  # a view: indexing rows one by one copies nothing
            out[i] = sample_row(row, req, float(row.max()))
    for i, req in enumerate(reqs):
        if req.grammar is not None:
            out[i] = apply_grammar(logits[rows[i]], req, req.grammar, out[i])
    return out


def apply_grammar(row: np.ndarray, req: Request, grammar: Grammar, token: int) -> int:
    """`token` (the chain's draw from `row`) if `grammar` allows it, else a new draw.

    The redraw runs the same chain (argmax when greedy) on `row` restricted to the
    allowed tokens, as if every other logit were -inf.  Where few tokens can follow
    (structure: punctuation, keys, enum values) the allowed set is exact, from the
    grammar's byte-level candidates; where many can (inside a string) it is the allowed
    part of about the row's `GRAMMAR_CANDIDATES` highest logits, and all candidates only
    if none of those is allowed.  A redraw takes the next number of the request's own
    random stream, so results stay seeded and independent of the batch.  Returns -1
    when the grammar allows no token (with a finite logit) at all.
    """
    if grammar.allows(token):
        return token
    keep: np.ndarray = np.zeros(0, dtype=np.int32)
    cand = grammar.candidates(limit=2 * GRAMMAR_CANDIDATES)
    if cand is None:
        top = _top_candidates(row, GRAMMAR_CANDIDATES)
        # -inf marks a token banned by logit bias: allowed or not, it stays out.
        keep = top[grammar.allowed(top) & (row[top] > -np.inf)]
        if not len(keep):
            cand = grammar.candidates()
    if cand is not None:
        keep = cand[grammar.allowed(cand) & (row[cand] > -np.inf)]
    if not len(keep):
        return -1
    # In token order, the allowed logits are the masked row without its -inf entries:
    # the chain sees the same candidates in the same order, at a fraction of the cost.
    keep.sort()
    values = row[keep]
    if req.params.greedy:
        return int(keep[int(np.argmax(values))])
    return int(keep[sample_row(values, req, float(values.max()))])


def _top_candidates(row: np.ndarray, k: int) -> np.ndarray:
    """About the `k` highest logits of `row` (at least k/2 of them, at most 2k).

    A full `argpartition` of a 262,144-token row costs ~1 ms; the k-th largest value of
    every 16th logit estimates the cut instead, and one comparison applies it.
    """
    n = len(row)
    if n <= 2 * k:
        return np.arange(n)
    step = 16
    sample = row[::step]
    kk = max(1, k // step)
    cut = np.partition(sample, len(sample) - kk)[len(sample) - kk]
    cand = np.flatnonzero(row >= cut)
    if len(cand) < k // 2 or len(cand) > 2 * k:  # a skewed sample: do it exactly
        cand = np.argpartition(row, n - k)[n - k :]
    return cand
