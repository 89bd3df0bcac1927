"""Logprobs on the real model: what they are, that asking for them changes nothing,
and that they equal llama-cpp-python's own logits for the same computation."""

from __future__ import annotations

import numpy as np
import pytest

from llamba_cli.engine import Engine, Request, SamplingParams

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
]


def run(engine: Engine, params: SamplingParams, prompts: list[str] = PROMPTS) -> list[Request]:
    reqs = [Request(id=i, prompt=p, params=params) for i, p in enumerate(prompts)]
    outs = []
    for r in reqs:
        engine.submit(r)
    while engine.has_work:
        outs.extend(engine.step())
    for r in reqs:  # the deltas' logprobs add up to the request's
        deltas = [lp for o in outs if o.request is r for lp in (o.logprobs or [])]
        assert deltas == (r.logprobs or [])
    return reqs


def log_softmax(row: np.ndarray) -> np.ndarray:
    x = row.astype(np.float64)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def test_logprobs_match_llama_cpp_python_at_one_slot(make_engine, reference, model):
    """At 1 slot llamba decodes each prompt whole, then one token at a time: the
    reference does the same (an empty cache for each prompt, one decode a token)."""
    k = 5
    engine = make_engine(slots=1, prefix_cache=False)
    reqs = run(engine, SamplingParams(temperature=0, max_tokens=8, logprobs=k))
    worst = 0.0
    for req in reqs:
        assert req.logprobs is not None and len(req.logprobs) == req.completion_tokens
        ref = reference.logprobs(req.tokens[: req.num_prompt])
        for entry in req.logprobs:
            worst = max(worst, abs(entry.logprob - ref[entry.token]))
            assert len(entry.top) == k
            for tok, _, lp in entry.top:
                worst = max(worst, abs(lp - ref[tok]))
            # no token the reference ranks clearly higher is missing from the top k
            assert entry.top[-1][2] >= np.sort(ref)[-k] - 1e-3
            ref = reference.extend([entry.token])
    assert worst <= 1e-3, worst


def test_logprob_entries_describe_the_drawn_tokens(make_engine, model):
    engine = make_engine(slots=3)
    reqs = run(engine, SamplingParams(temperature=0, max_tokens=6, logprobs=3))
    for req in reqs:
        assert req.logprobs is not None
        assert [e.token for e in req.logprobs] == req.generated()
        for e in req.logprobs:
            assert e.text == model.piece(e.token)
            assert e.logprob <= 0
            assert e.top[0][0] == e.token  # greedy: the most likely one
            assert e.top[0][2] == e.logprob
            lps = [lp for _, _, lp in e.top]
            assert lps == sorted(lps, reverse=True) and len(lps) == 3
            assert all(text == model.piece(t) for t, text, _ in e.top)
            assert sum(np.exp(lps)) <= 1 + 1e-6
    only = run(engine, SamplingParams(temperature=0, max_tokens=4, logprobs=0))
    assert all(e.top == [] for r in only for e in r.logprobs or [])
    none = run(engine, SamplingParams(temperature=0, max_tokens=4))
    assert all(r.logprobs is None for r in none)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0, max_tokens=12),
        SamplingParams(temperature=0.9, max_tokens=12, seed=5),
        SamplingParams(temperature=0.9, max_tokens=12, seed=5, repeat_penalty=1.5),
    ],
    ids=["greedy", "sampled", "penalized"],
)
def test_asking_for_logprobs_changes_no_token(make_engine, params):
    plain = run(make_engine(slots=1, prefix_cache=False), params)
    with_lp = SamplingParams(**{**params.__dict__, "logprobs": 20})
    asked = run(make_engine(slots=1, prefix_cache=False), with_lp)
    assert [r.generated() for r in asked] == [r.generated() for r in plain]
    assert all(len(r.logprobs or []) == r.completion_tokens for r in asked)


def test_logprobs_are_after_logit_bias(make_engine, model):
    """The bias is part of the reported distribution: a token pushed far up is the
    one drawn, with a logprob near 0."""
    target = model.tokenize(" banana", add_bos=False)[0]
    params = SamplingParams(
        temperature=0, max_tokens=2, logprobs=2, logit_bias=((target, 60.0),), ignore_eos=True
    )
    [req] = run(make_engine(slots=1), params, PROMPTS[:1])
    assert req.logprobs is not None
    assert [e.token for e in req.logprobs] == [target, target]
    assert all(-1e-3 < e.logprob <= 0 for e in req.logprobs)
