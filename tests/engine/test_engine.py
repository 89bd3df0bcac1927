"""The engine on the real embedded model: text, stopping, errors, KV pressure."""

from __future__ import annotations

import numpy as np
import pytest

from llamba_cli.engine import Request, SamplingParams
from llamba_cli.engine.llama import repack_supported
from tests.conftest import NOISE_FACTOR

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
    """The same computation: each prompt evaluated whole in one decode, then one token
    a decode, on the same context settings. Equal text, on every CPU."""
    engine = make_engine(slots=1, prefix_cache=False)
    ours = run(engine, PROMPTS)
    for req, prompt in zip(ours, PROMPTS, strict=True):
        reference_llm.reset()  # else `Llama` evaluates only what follows the last prompt
        ref = reference_llm(prompt, max_tokens=24, temperature=0)["choices"][0]["text"]
        assert req.error is None
        assert req.text == ref, prompt


@pytest.fixture(scope="module")
def noise(reference):
    """llama.cpp's own batch-shape noise on this machine (see tests/conftest.py): the
    log-probabilities of the two most likely next tokens, after each prompt and after
    its greedy continuation, as one decode vs split into decodes of other sizes."""
    seqs = []
    for prompt in PROMPTS:
        toks = reference.tokenize(prompt)
        seqs += [toks, toks + reference.greedy(toks, 16)]
    return max(reference.top_noise(seqs), 1e-4)


def assert_greedy_within_noise(reference, done, prompts, noise):
    """Every token a batch chose is a greedy choice of llama.cpp's own evaluation of
    the same text, up to batch-shape noise: its log-probability lies at most
    2 * NOISE_FACTOR * noise below the best token's (both moved by at most
    NOISE_FACTOR * noise). Where two tokens are that close a batch may take either,
    and the texts part; a token from another row's logits or from a wrong KV cell
    lies nats below."""
    bound = 2 * NOISE_FACTOR * noise
    for req, prompt in zip(done, prompts, strict=True):
        assert req.error is None, req.error
        gaps = reference.greedy_gaps(reference.tokenize(prompt), req.generated())
        assert gaps.max() <= bound, (prompt, req.text, gaps.round(3).tolist(), bound)


def test_many_slots_choose_greedy_tokens_within_llama_cpp_noise(make_engine, reference, noise):
    """Twelve rows on eight slots: the first eight decode together, the others join as
    slots free up, so prompt chunks and decode tokens share steps."""
    prompts = PROMPTS * 2
    many = run(make_engine(slots=8, prefix_cache=False), prompts)
    again = run(make_engine(slots=8, prefix_cache=False), prompts)
    assert [r.text for r in again] == [r.text for r in many]  # same batches, same bits
    assert_greedy_within_noise(reference, many, prompts, noise)


# One token each after these prompts: log P(label | prompt) is one logits entry.
NEXT_WORDS = ("Paris", "London", "the", "a", "red", "blue", "return")


def test_many_slots_logits_within_llama_cpp_noise(make_engine, reference, model):
    """Log-probabilities of fixed next tokens: at 1 slot exactly llama.cpp's for the
    prompt evaluated whole; in a batch of other rows within NOISE_FACTOR times the
    noise llama.cpp itself shows on these prompts, and each row still closest to its
    own prompt's 1-slot values (not another row's)."""
    ids = [model.tokenize(" " + w, add_bos=False) for w in NEXT_WORDS]
    assert all(len(t) == 1 for t in ids)
    ids = [t[0] for t in ids]
    one = label_logprobs(make_engine(slots=1, prefix_cache=False), PROMPTS, NEXT_WORDS)
    many = label_logprobs(make_engine(slots=8, prefix_cache=False), PROMPTS * 2, NEXT_WORDS)
    seqs = [reference.tokenize(p) for p in PROMPTS]
    whole = np.array([reference.logprobs(s)[ids] for s in seqs])
    assert np.abs(one - whole).max() < 1e-6  # the same logits; float64 normalizer rounding
    noise = reference.shape_noise(seqs, lambda s, shape: reference.logprobs(s, shape)[ids])
    diff = np.abs(many - np.vstack([one, one]))
    assert diff.max() <= NOISE_FACTOR * max(noise, 1e-4), (diff.max(), noise)
    for i, row in enumerate(many):
        assert np.abs(one - row).max(axis=1).argmin() == i % len(PROMPTS)


def label_logprobs(engine, prompts, labels):
    done = run(engine, prompts, labels=labels)
    assert all(r.error is None for r in done), [r.error for r in done]
    return np.array([r.label_logprobs for r in done])


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


def test_kv_pressure_preempts_and_recovers(make_engine, reference, noise):
    """A KV cache too small for all slots at once: llama_decode returns 1, the engine
    preempts and recomputes, and every request still completes, each token a greedy
    choice for its own text (a recomputed row with a wrong KV cell would not be)."""
    params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    prompts = PROMPTS[:4]
    tight_engine = make_engine(slots=4, prefix_cache=False, kv_cells=256)
    assert tight_engine.config.n_ctx < 4 * 100  # four full sequences cannot fit at once
    tight = run(tight_engine, prompts, params)
    assert tight_engine.stats.kv_retries > 0
    assert all(r.error is None and r.completion_tokens == 100 for r in tight)
    assert_greedy_within_noise(reference, tight, prompts, noise)


def test_seeded_sampling_is_reproducible_and_batch_independent(make_engine):
    """A row draws from its own random stream: the same seed repeats its text, and
    what the other rows of its batch draw does not change its draws. The batches
    compared have the same shape at every step (all rows run 16 tokens), so the
    logits are the same bits and only the draws could differ."""
    params = SamplingParams(temperature=0.8, max_tokens=16, seed=1234, ignore_eos=True)
    prompts = ["A list of fruits:", "Numbers: 1, 2,", "Dear John,"]
    alone = run(make_engine(slots=1, prefix_cache=False), prompts[:1], params)[0]
    again = run(make_engine(slots=1, prefix_cache=False), prompts[:1], params)[0]
    other_seed = run(
        make_engine(slots=1, prefix_cache=False),
        prompts[:1],
        SamplingParams(temperature=0.8, max_tokens=16, seed=99, ignore_eos=True),
    )[0]
    assert alone.text == again.text
    assert other_seed.text != alone.text

    def in_crowd(partner_params):
        reqs = [Request(id=0, prompt=prompts[0], params=params)] + [
            Request(id=i, prompt=p, params=partner_params(i))
            for i, p in enumerate(prompts[1:], start=1)
        ]
        done = sorted(make_engine(slots=3, prefix_cache=False).run(reqs), key=lambda r: r.id)
        assert all(r.completion_tokens == 16 for r in done)
        return done

    greedy = in_crowd(lambda i: SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    drawing = in_crowd(
        lambda i: SamplingParams(temperature=1.5, max_tokens=16, seed=7 * i, ignore_eos=True)
    )
    assert drawing[0].text == greedy[0].text
    assert [r.text for r in drawing[1:]] != [r.text for r in greedy[1:]]


def test_empty_prompt_is_bos_alone_and_generates(make_engine, model, reference):
    """The embedded model adds BOS, so an empty prompt is BOS alone: it generates
    unconditioned text, as llama.cpp does from BOS. (A prompt with no tokens at all,
    possible only with a model that adds no BOS, is an error row.)"""
    assert model.add_bos
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    [req] = run(make_engine(slots=1, prefix_cache=False), [""], params)
    assert req.error is None
    assert req.prompt_tokens == 1
    assert req.generated() == reference.greedy([model.bos], 8)


def test_weight_repacking_is_off_where_llama_cpp_has_its_amx_path():
    """llama.cpp's AMX path crashes on Q4_K models (README, Notes): wherever this build
    of llama.cpp has it, llamba must load weights without the extra buffer types,
    whatever the OS (llamba reads /proc/cpuinfo, which only Linux has)."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode()
    assert "REPACK" in info or "AMX" not in info  # the feature list is what we parse
    if "AMX_INT8 = 1" in info:
        assert not repack_supported(), info


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


def test_prefix_cache_matches_no_cache_and_computes_the_head_once(
    make_engine, model, reference, noise
):
    """Rows sharing a few-shot head: the head is evaluated once and every row's tokens
    stay greedy choices for its own text (splitting a prompt across decodes moves
    logits by llama.cpp's own noise, so texts may part at a near-tie)."""
    questions = ["What is frozen water called?", "Where do fish live?", "What do bees make?"]
    prompts = [FEW_SHOT_HEAD + f"Q: {q}\nA:" for q in questions]
    off_engine = make_engine(slots=4, prefix_cache=False)
    run(off_engine, prompts)
    on_engine = make_engine(slots=4)
    on = run(on_engine, prompts)
    assert_greedy_within_noise(reference, on, prompts, noise)
    head = len(model.tokenize(FEW_SHOT_HEAD))
    st = on_engine.stats
    assert st.prompt_tokens == off_engine.stats.prompt_tokens == sum(r.prompt_tokens for r in on)
    assert st.prompt_tokens_reused >= len(prompts) * (head - 2)
    # The shared head was evaluated once: everything else is the rows' own tails.
    assert st.prompt_tokens_evaluated <= st.prompt_tokens - (len(prompts) - 1) * (head - 2)
