"""Label scoring on the real model against llama-cpp-python's own logits."""

from __future__ import annotations

import numpy as np
import pytest

from llamba_cli.engine import Request, normalize
from tests.conftest import NOISE_FACTOR, SHAPES

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


def classify(engine, labels):
    reqs = [Request(id=i, prompt=p, labels=labels) for i, p in enumerate(PROMPTS)]
    done = sorted(engine.run(reqs), key=lambda r: r.id)
    assert all(r.error is None for r in done), [r.error for r in done]
    return np.array([r.label_logprobs for r in done])


@pytest.mark.parametrize("labels", LABEL_SETS, ids=["single", "shared-prefix", "prefix-label"])
def test_one_slot_equals_reference(make_engine, reference, labels):
    """The same computation (each prompt whole, each inner label node in a decode of
    its own): the same logits, so the same log-probabilities up to the rounding of
    the float64 normalizer."""
    ours = classify(make_engine(slots=1, prefix_cache=False), labels)
    ref = np.array([reference.label_logprobs(p, labels) for p in PROMPTS])
    assert np.abs(ours - ref).max() < 1e-6, np.abs(ours - ref).max()
    probs = np.array([normalize(list(r)) for r in ours])
    assert np.allclose(probs.sum(axis=1), 1.0)


@pytest.fixture(scope="module")
def label_noise(reference):
    """llama.cpp's own batch-shape noise, per label: the largest change of log P(label |
    prompt) over these prompts when each is split into decodes (at the shared head,
    in halves, in chunks) instead of evaluated in one."""
    labels = tuple(dict.fromkeys(lab for labels in LABEL_SETS for lab in labels))
    toks = [reference.tokenize(p) for p in PROMPTS]
    head = next(i for i, col in enumerate(zip(*toks, strict=False)) if len(set(col)) > 1)
    worst = np.zeros(len(labels))
    for prompt in PROMPTS:
        whole = np.array(reference.label_logprobs(prompt, labels))
        for shape in (*SHAPES, head):  # `head`: the shared head, then the row's tail
            split = np.array(reference.label_logprobs(prompt, labels, shape))
            worst = np.maximum(worst, np.abs(split - whole))
    return dict(zip(labels, worst.tolist(), strict=True))


@pytest.mark.parametrize("labels", LABEL_SETS, ids=["single", "shared-prefix", "prefix-label"])
def test_default_slots_with_prefix_cache_within_batching_noise(make_engine, label_noise, labels):
    """16 slots with the prefix cache (the few-shot head evaluated once, each row's
    tail after it): every log-probability within NOISE_FACTOR times the change
    llama.cpp itself shows when these prompts are split into decodes."""
    one = classify(make_engine(slots=1, prefix_cache=False), labels)
    engine = make_engine(slots=16)
    many = classify(engine, labels)
    assert engine.stats.prompt_tokens_reused > 0  # the few-shot head was shared
    noise = max(max(label_noise[lab] for lab in labels), 1e-4)
    diff = np.abs(one - many)
    assert diff.max() <= NOISE_FACTOR * noise, (diff.max(), noise)


def test_prefix_label_scores_the_answer_beginning_with_it(make_engine):
    """A label that is a prefix of another ("good" next to "good enough") is scored
    as "the answer begins with good": its log-probability is the one it has in a set
    without the longer label (same decodes at 1 slot, so the same bits), and
    "good enough" adds the strictly negative log P(" enough" | ... good)."""
    with_ext = classify(make_engine(slots=1, prefix_cache=False), ("good", "good enough", "bad"))
    without = classify(make_engine(slots=1, prefix_cache=False), ("good", "bad"))
    assert (with_ext[:, [0, 2]] == without).all()
    assert (with_ext[:, 1] < with_ext[:, 0]).all()


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
