"""Label scoring on the real model against llama-cpp-python's own logits."""

from __future__ import annotations

import numpy as np
import pytest

from llamba_cli.engine import Request, normalize

FEW_SHOT = (
    "Classify the sentiment of each review.\n\n"
    "Review: I use it every day and it never lets me down.\nSentiment: positive\n\n"
    "Review: It broke after two days.\nSentiment: negative\n\n"
    "Review: {}\nSentiment:"
)
REVIEWS = [
    "The battery lasts all day and the screen is gorgeous.",
    "Stopped working after a week. Complete waste of money.",
    "Fast shipping, exactly as described.",
    "The sound quality is terrible.",
    "I love how light and comfortable it is.",
    "Customer support never answered my emails.",
]
PROMPTS = [FEW_SHOT.format(r) for r in REVIEWS]
LABEL_SETS = [
    ("positive", "negative"),
    ("very good", "very bad", "mixed feelings"),  # multi-token, shared leading token
    ("good", "good enough", "bad"),  # a label that is a prefix of another
]


def log_softmax(row: np.ndarray) -> np.ndarray:
    row = row.astype(np.float64)
    m = row.max()
    return row - (m + np.log(np.exp(row - m).sum()))


def reference_logprobs(llm, prompt: str, labels: tuple[str, ...]) -> list[float]:
    """log P(label | prompt) the slow, obvious way: per label, evaluate the prompt, then
    the label's tokens, and sum log-softmax over every label token."""
    tok = lambda s: llm.tokenize(s.encode(), add_bos=True, special=True)  # noqa: E731
    ptoks = tok(prompt)
    fulls = [tok(prompt + " " + lab) for lab in labels]
    ctx = min(
        min(
            next((i for i, (a, b) in enumerate(zip(ptoks, f, strict=False)) if a != b), len(ptoks)),
            len(f) - 1,
        )
        for f in fulls
    )
    out = []
    for full in fulls:
        llm.reset()
        llm.eval(full[:ctx])  # the prompt in one piece, as llamba evaluates it at 1 slot
        if len(full) - 1 > ctx:
            llm.eval(full[ctx:-1])  # the label's own tokens but the last
        scores = np.asarray(llm.scores[: len(full) - 1])
        out.append(sum(log_softmax(scores[j - 1])[full[j]] for j in range(ctx, len(full))))
    return out


def classify(engine, labels):
    reqs = [Request(id=i, prompt=p, labels=labels) for i, p in enumerate(PROMPTS)]
    done = sorted(engine.run(reqs), key=lambda r: r.id)
    assert all(r.error is None for r in done), [r.error for r in done]
    return np.array([r.label_logprobs for r in done])


@pytest.mark.parametrize("labels", LABEL_SETS, ids=["single", "shared-prefix", "prefix-label"])
def test_one_slot_equals_reference(make_engine, reference_scorer, labels):
    ours = classify(make_engine(slots=1, prefix_cache=False), labels)
    ref = np.array([reference_logprobs(reference_scorer, p, labels) for p in PROMPTS])
    probs = np.array([normalize(list(r)) for r in ours])
    ref_probs = np.array([normalize(list(r)) for r in ref])
    assert np.allclose(probs.sum(axis=1), 1.0)
    assert np.abs(probs - ref_probs).max() < 1e-3, np.abs(probs - ref_probs).max()
    assert np.abs(ours - ref).max() < 1e-2


@pytest.mark.parametrize("labels", LABEL_SETS, ids=["single", "shared-prefix", "prefix-label"])
def test_default_slots_with_prefix_cache_within_batching_noise(make_engine, labels):
    one = classify(make_engine(slots=1, prefix_cache=False), labels)
    engine = make_engine(slots=16)
    many = classify(engine, labels)
    p1 = np.array([normalize(list(r)) for r in one])
    pm = np.array([normalize(list(r)) for r in many])
    # llama.cpp's own batch-shape noise: p95 |dp| ~0.02-0.06 (see the engine notes).
    assert np.abs(p1 - pm).max() < 0.1
    assert (p1.argmax(axis=1) == pm.argmax(axis=1)).mean() >= 5 / 6
    assert engine.stats.prompt_tokens_reused > 0  # the few-shot head was shared


def test_prefix_label_is_at_least_as_likely_as_its_extension(make_engine):
    lp = classify(make_engine(slots=4), ("good", "good enough"))
    assert (lp[:, 0] >= lp[:, 1]).all()


def test_single_token_labels_cost_nothing_beyond_the_prompt(make_engine, model):
    labels = ("positive", "negative")
    assert all(len(model.tokenize(" " + lab, add_bos=False)) == 1 for lab in labels)
    engine = make_engine(slots=4, prefix_cache=False)
    classify(engine, labels)
    assert engine.stats.label_tokens_evaluated == 0


def test_shared_label_tokens_are_evaluated_once(make_engine, model):
    labels = ("very good", "very bad")
    engine = make_engine(slots=4, prefix_cache=False)
    classify(engine, labels)
    # "very" is the only internal node of this label trie: one extra token per row.
    assert engine.stats.label_tokens_evaluated == len(PROMPTS)
