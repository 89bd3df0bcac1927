"""The engine on the real embedded model: text, stopping, errors, KV pressure."""

from __future__ import annotations

import numpy as np
import pytest

from llamba_cli.engine import Request, SamplingParams

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
    "My favourite recipe for pancakes starts with",
]
GREEDY = SamplingParams(temperature=0, max_tokens=24)


def run(engine, prompts, params=GREEDY, **kw):
    reqs = [Request(id=i, prompt=p, params=params, **kw) for i, p in enumerate(prompts)]
    done = list(engine.run(reqs))
    assert sorted(r.id for r in done) == list(range(len(prompts)))
    return sorted(done, key=lambda r: r.id)


def test_one_slot_greedy_text_equals_llama_cpp_python(make_engine, reference_llm):
    engine = make_engine(slots=1, prefix_cache=False)
    ours = run(engine, PROMPTS)
    for req, prompt in zip(ours, PROMPTS, strict=True):
        ref = reference_llm(prompt, max_tokens=24, temperature=0)["choices"][0]["text"]
        assert req.error is None
        assert req.text == ref, prompt


def test_many_slots_agree_with_one_slot(make_engine):
    """Same greedy tokens for most rows. Batch shape changes llama.cpp's kernels, and a
    near-tie (this model has several within 0.2 nats on these prompts) may flip one
    token, after which greedy texts diverge: so compare the first tokens of every row
    and whole texts for half of them."""
    one = run(make_engine(slots=1, prefix_cache=False), PROMPTS)
    many = run(make_engine(slots=8, prefix_cache=False), PROMPTS * 2)
    pairs = list(zip(one * 2, many, strict=True))
    head = sum(a.generated()[:8] == b.generated()[:8] for a, b in pairs)
    whole = sum(a.text == b.text for a, b in pairs)
    assert head >= 2 * len(pairs) // 3, [(a.text, b.text) for a, b in pairs]
    assert whole >= len(pairs) // 2
    # Identical prompts in one batch must give identical greedy text.
    assert [r.text for r in many[:6]] == [r.text for r in many[6:]]


def test_many_slots_logits_within_tolerance(make_engine):
    """Log-probabilities of fixed next tokens, alone vs in a full batch of other rows."""
    labels = ("Paris", "London", "the", "a", "red", "blue", "100", "return")
    one = run(make_engine(slots=1, prefix_cache=False), PROMPTS, labels=labels)
    many = run(make_engine(slots=8, prefix_cache=False), PROMPTS, labels=labels)
    a = np.array([r.label_logprobs for r in one])
    b = np.array([r.label_logprobs for r in many])
    assert np.abs(a - b).max() < 0.5
    assert (a.argmax(axis=1) == b.argmax(axis=1)).mean() >= 5 / 6


def test_max_tokens_ends_with_length(make_engine):
    [req] = run(
        make_engine(slots=2),
        ["Count: one, two, three,"],
        SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
    )
    assert req.finish_reason == "length"
    assert req.completion_tokens == 5


def test_end_of_generation_token_stops(make_engine, model):
    force_eos = SamplingParams(temperature=0, max_tokens=10, logit_bias=((model.eos, 100.0),))
    [req] = run(make_engine(slots=2), ["Hello"], force_eos)
    assert req.finish_reason == "stop"
    assert req.completion_tokens == 0
    assert req.text == ""


def test_stop_string_across_tokens_is_excluded(make_engine):
    engine = make_engine(slots=2)
    [free] = run(
        engine, ["The three primary colors are"], SamplingParams(temperature=0, max_tokens=24)
    )
    text = free.text
    cut = len(text) // 2
    stop = text[cut - 3 : cut + 3]  # six characters: almost surely spans a token boundary
    assert text.find(stop) >= 0
    [stopped] = run(
        engine,
        ["The three primary colors are"],
        SamplingParams(temperature=0, max_tokens=24, stop=(stop,)),
    )
    assert stopped.finish_reason == "stop"
    assert stopped.text == text[: text.find(stop)]


def test_too_long_prompt_is_an_error_row_and_others_complete(make_engine):
    engine = make_engine(slots=4, n_ctx_seq=64)
    prompts = ["Hello there,", "word " * 200, "The sky is"]
    done = run(engine, prompts, SamplingParams(temperature=0, max_tokens=8))
    assert done[1].finish_reason == "error"
    assert "tokens" in (done[1].error or "")
    assert [done[0].error, done[2].error] == [None, None]
    assert done[0].completion_tokens > 0 and done[2].completion_tokens > 0


def test_kv_pressure_preempts_and_recovers(make_engine):
    """A KV cache too small for all slots at once: llama_decode returns 1, the engine
    preempts and recomputes, and every request still completes with the same text."""
    params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    prompts = PROMPTS[:4]
    tight_engine = make_engine(slots=4, prefix_cache=False, kv_cells=256)
    assert tight_engine.ctx.n_ctx < 4 * 100  # four full sequences cannot fit at once
    tight = run(tight_engine, prompts, params)
    assert tight_engine.stats.kv_retries > 0
    assert all(r.error is None and r.completion_tokens == 100 for r in tight)
    roomy = run(make_engine(slots=4, prefix_cache=False), prompts, params)
    head = sum(a.generated()[:16] == b.generated()[:16] for a, b in zip(roomy, tight, strict=True))
    assert head >= 3


def test_seeded_sampling_is_reproducible_and_batch_independent(make_engine):
    params = SamplingParams(temperature=0.8, max_tokens=16, seed=1234)
    prompts = ["A list of fruits:", "Numbers: 1, 2,", "Dear John,"]
    alone = run(make_engine(slots=1, prefix_cache=False), prompts[:1], params)[0]
    again = run(make_engine(slots=1, prefix_cache=False), prompts[:1], params)[0]
    crowd = run(make_engine(slots=4, prefix_cache=False), prompts, params)[0]
    other_seed = run(
        make_engine(slots=1, prefix_cache=False),
        prompts[:1],
        SamplingParams(temperature=0.8, max_tokens=16, seed=99),
    )[0]
    assert alone.text == again.text
    # The row draws from its own stream, so other rows in the batch do not change its
    # draws; only llama.cpp's batch-shape noise could move a draw across a boundary.
    assert alone.generated()[:4] == crowd.generated()[:4]
    assert other_seed.text != alone.text


def test_empty_prompt_is_an_error_row(make_engine):
    [req] = run(make_engine(slots=1), [""], GREEDY)
    # The model adds BOS, so an empty string still has one token and generates.
    assert req.error is None or "empty" in req.error


@pytest.mark.parametrize("slots", [1, 3])
def test_engine_step_api(make_engine, slots):
    """The library API without `run`: submit, then step until everything is back."""
    engine = make_engine(slots=slots)
    for i, p in enumerate(PROMPTS[:4]):
        engine.submit(Request(id=i, prompt=p, params=SamplingParams(temperature=0, max_tokens=4)))
    got = []
    while engine.has_work:
        got.extend(o.request for o in engine.step() if o.finished)
    assert sorted(r.id for r in got) == [0, 1, 2, 3]
    assert engine.stats.generated_tokens == sum(r.completion_tokens for r in got)


FEW_SHOT_HEAD = (
    "Answer each question with one short sentence.\n\n"
    "Q: What colour is the sky on a clear day?\nA: The sky is blue.\n\n"
    "Q: How many legs does a spider have?\nA: A spider has eight legs.\n\n"
)


def test_prefix_cache_matches_no_cache_and_computes_the_head_once(make_engine, model):
    questions = ["What is frozen water called?", "Where do fish live?", "What do bees make?"]
    prompts = [FEW_SHOT_HEAD + f"Q: {q}\nA:" for q in questions]
    off_engine = make_engine(slots=4, prefix_cache=False)
    off = run(off_engine, prompts)
    on_engine = make_engine(slots=4)
    on = run(on_engine, prompts)
    # Splitting a prompt across decodes moves logits a little (llama.cpp's own noise),
    # so compare the first tokens, and whole texts for most rows.
    assert all(a.generated()[:4] == b.generated()[:4] for a, b in zip(off, on, strict=True))
    assert sum(a.text == b.text for a, b in zip(off, on, strict=True)) >= 2
    head = len(model.tokenize(FEW_SHOT_HEAD))
    st = on_engine.stats
    assert st.prompt_tokens == off_engine.stats.prompt_tokens == sum(r.prompt_tokens for r in on)
    assert st.prompt_tokens_reused >= len(prompts) * (head - 2)
    # The shared head was evaluated once: everything else is the rows' own tails.
    assert st.prompt_tokens_evaluated <= st.prompt_tokens - (len(prompts) - 1) * (head - 2)
