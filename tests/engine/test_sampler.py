"""The sampler on hand-made logits: greedy, top-k / top-p / min-p / temperature in
llama.cpp's order, logit bias, penalties, per-request random streams, the model's vocabulary size.

Expected values are computed here, independently, in float64 with numpy: the
reference chain is llama.cpp's default one (logit bias, penalties, top-k, top-p,
min-p on the untempered softmax, then temperature over the survivors).
"""

from __future__ import annotations

import numpy as np
import pytest

from llamba_cli.engine.config import SamplingParams
from llamba_cli.engine.request import Request
from llamba_cli.engine.sampler import apply_bias_and_penalties, sample

V = 1000

# A peaked distribution over V tokens: five head tokens, the rest share 4%.
HEAD = {17: 0.40, 503: 0.25, 2: 0.15, 999: 0.10, 250: 0.06}


def peaked_row(vocab: int = V) -> np.ndarray:
    p = np.full(vocab, (1.0 - sum(HEAD.values())) / (vocab - len(HEAD)))
    for tok, prob in HEAD.items():
        p[tok] = prob
    return np.log(p).astype(np.float32)


def make_req(
    seed: int | None = 0, *, tokens: list[int] | None = None, num_prompt: int = 0, **params: object
) -> Request:
    req = Request(id=seed, prompt="", params=SamplingParams(**params))  # type: ignore[arg-type]
    req.rng = np.random.default_rng(seed)
    if tokens is not None:
        req.tokens = list(tokens)
        req.num_prompt = num_prompt
    return req


def softmax64(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def reference_dist(
    row: np.ndarray, *, temperature: float, top_k: int, top_p: float, min_p: float
) -> np.ndarray:
    """llama.cpp's chain, written out: top-k, then top-p over the survivors' softmax,
    then min-p relative to the most likely survivor, then temperature."""
    x = row.astype(np.float64)
    keep = np.argsort(-x, kind="stable")
    if top_k > 0:
        keep = keep[:top_k]
    if top_p < 1.0:
        cum = np.cumsum(softmax64(x[keep]))
        keep = keep[: int(np.argmax(cum >= top_p)) + 1]
    if min_p > 0:
        p = softmax64(x[keep])
        keep = keep[p >= min_p * p.max()]
    out = np.zeros(len(row))
    out[keep] = softmax64(x[keep] / temperature)
    return out


def draw_counts(
    row: np.ndarray, n: int, *, batch: int = 250, seed: int = 0, **params: object
) -> np.ndarray:
    """Token frequencies over `n` draws: `batch` requests (own seeds) over copies of `row`."""
    reqs = [make_req(seed * 1_000_003 + i, **params) for i in range(batch)]
    counts = np.zeros(len(row), dtype=np.int64)
    block = np.tile(row, (batch, 1))
    for _ in range(n // batch):
        toks = sample(block.copy(), list(range(batch)), reqs)
        np.add.at(counts, toks, 1)
    return counts


def assert_distribution(counts: np.ndarray, expected: np.ndarray) -> None:
    """Tokens outside the expected support never drawn; a chi-square statistic over
    the support far below what any wrong distribution of these tests gives."""
    n = counts.sum()
    support = expected > 0
    outside = np.flatnonzero(counts & ~support)
    assert outside.size == 0, f"drew tokens outside the support: {outside.tolist()}"
    exp = expected[support] * n
    chi2 = float(((counts[support] - exp) ** 2 / exp).sum())
    df = int(support.sum()) - 1
    # P(chi2 > 30) < 1e-5 for df <= 5; deterministic seeds make this exact anyway.
    assert df <= 5
    assert chi2 < 30, f"chi2 = {chi2:.1f} (df={df}); counts {counts[support]} vs {exp.round()}"


# -- reference self-check -----------------------------------------------------------


def test_reference_distribution_is_what_the_tests_assume() -> None:
    row = peaked_row()
    d = reference_dist(row, temperature=1.0, top_k=0, top_p=1.0, min_p=0.2)
    assert sorted(np.flatnonzero(d).tolist()) == [2, 17, 503, 999]
    np.testing.assert_allclose(
        d[[17, 503, 2, 999]], np.array([0.4, 0.25, 0.15, 0.1]) / 0.9, rtol=1e-6
    )
    d = reference_dist(row, temperature=1.0, top_k=0, top_p=0.75, min_p=0.0)
    assert sorted(np.flatnonzero(d).tolist()) == [2, 17, 503]


# -- greedy ---------------------------------------------------------------------------


def test_greedy_is_argmax_per_row() -> None:
    logits = np.random.default_rng(1).standard_normal((8, V)).astype(np.float32)
    expected = logits.argmax(axis=1).tolist()
    reqs = [make_req(i, temperature=0.0) for i in range(8)]
    assert sample(logits.copy(), list(range(8)), reqs) == expected


@pytest.mark.parametrize(
    "rows",
    [
        [7, 2, 5, 0, 9],  # greedy rows 7, 5, 9: non-contiguous and out of order
        [3, 4, 0, 5, 1],  # greedy rows 3, 5, 1
        [4, 0, 5, 1, 6],  # greedy rows 4, 5, 6: a contiguous run (a view)
    ],
)
def test_greedy_rows_mixed_with_sampled_rows(rows: list[int]) -> None:
    logits = np.random.default_rng(2).standard_normal((10, V)).astype(np.float32)
    argmax = logits.argmax(axis=1)
    # Requests 0, 2, 4 are greedy; 1 and 3 sample with top_k=1 (also argmax).
    reqs = [
        make_req(0, temperature=0.0),
        make_req(1, temperature=1.3, top_k=1),
        make_req(2, temperature=0.0),
        make_req(3, temperature=0.7, top_k=1),
        make_req(4, temperature=0.0),
    ]
    assert sample(logits.copy(), rows, reqs) == [int(argmax[r]) for r in rows]


def test_greedy_ignores_every_truncation_parameter() -> None:
    logits = np.random.default_rng(3).standard_normal((4, V)).astype(np.float32)
    reqs = [make_req(i, temperature=0.0, top_k=5, top_p=0.1, min_p=0.9) for i in range(4)]
    assert sample(logits.copy(), [0, 1, 2, 3], reqs) == logits.argmax(axis=1).tolist()


def test_greedy_does_not_use_the_random_stream() -> None:
    logits = np.random.default_rng(4).standard_normal((1, V)).astype(np.float32)
    req = make_req(5, temperature=0.0)
    sample(logits.copy(), [0], [req])
    assert req.rng is not None
    assert req.rng.random() == np.random.default_rng(5).random()


def test_empty_batch() -> None:
    assert sample(np.zeros((0, V), dtype=np.float32), [], []) == []


# -- top-k, min-p, top-p, temperature --------------------------------------------------


@pytest.mark.parametrize("temperature", [0.05, 0.8, 1.0, 3.0, 100.0])
def test_top_k_1_is_argmax_at_any_temperature(temperature: float) -> None:
    logits = np.random.default_rng(6).standard_normal((6, V)).astype(np.float32)
    expected = logits.argmax(axis=1).tolist()
    for seed in range(20):
        reqs = [
            make_req(seed * 10 + i, temperature=temperature, top_k=1, top_p=1.0, min_p=0.0)
            for i in range(6)
        ]
        assert sample(logits.copy(), list(range(6)), reqs) == expected


def test_top_k_keeps_exactly_the_k_best() -> None:
    row = peaked_row()
    counts = draw_counts(row, 10_000, temperature=1.0, top_k=3, top_p=1.0, min_p=0.0)
    expected = reference_dist(row, temperature=1.0, top_k=3, top_p=1.0, min_p=0.0)
    assert sorted(np.flatnonzero(expected).tolist()) == [2, 17, 503]
    assert_distribution(counts, expected)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_min_p_on_untempered_probabilities(temperature: float) -> None:
    # min_p=0.2: keep p >= 0.08 = {0.40, 0.25, 0.15, 0.10}; 0.06 and the tail go.
    # Tempered first, T=0.5 would keep only two tokens and T=2 six or more.
    row = peaked_row()
    params = dict(temperature=temperature, top_k=0, top_p=1.0, min_p=0.2)
    expected = reference_dist(row, **params)  # type: ignore[arg-type]
    assert sorted(np.flatnonzero(expected).tolist()) == [2, 17, 503, 999]
    counts = draw_counts(row, 10_000, seed=int(temperature * 10), **params)
    assert_distribution(counts, expected)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_top_p_keeps_smallest_set_reaching_p(temperature: float) -> None:
    # Cumulative 0.40, 0.65, 0.80: top_p=0.75 keeps three tokens at every temperature.
    row = peaked_row()
    params = dict(temperature=temperature, top_k=0, top_p=0.75, min_p=0.0)
    expected = reference_dist(row, **params)  # type: ignore[arg-type]
    assert sorted(np.flatnonzero(expected).tolist()) == [2, 17, 503]
    np.testing.assert_allclose(
        expected[[17, 503, 2]], softmax64(np.log([0.40, 0.25, 0.15]) / temperature), rtol=1e-6
    )
    counts = draw_counts(row, 10_000, seed=int(temperature * 10) + 1, **params)
    assert_distribution(counts, expected)


@pytest.mark.parametrize(
    ("top_p", "kept"), [(0.39, 1), (0.41, 2), (0.64, 2), (0.66, 3), (0.89, 4), (0.91, 5)]
)
def test_top_p_boundaries(top_p: float, kept: int) -> None:
    row = peaked_row()
    counts = draw_counts(row, 2_000, temperature=1.0, top_k=0, top_p=top_p, min_p=0.0)
    expected = reference_dist(row, temperature=1.0, top_k=0, top_p=top_p, min_p=0.0)
    assert np.count_nonzero(expected) == kept
    assert np.count_nonzero(counts) == kept
    assert set(np.flatnonzero(counts)) == set(np.flatnonzero(expected))


def test_top_p_is_relative_to_the_top_k_survivors() -> None:
    # top_k=3 leaves 0.40, 0.25, 0.15 (mass 0.8) -> renormalized 0.5, 0.3125, 0.1875;
    # top_p=0.75 then keeps two (0.8125 >= 0.75); over the full mass it would keep three.
    row = peaked_row()
    params = dict(temperature=1.0, top_k=3, top_p=0.75, min_p=0.0)
    expected = reference_dist(row, **params)  # type: ignore[arg-type]
    assert sorted(np.flatnonzero(expected).tolist()) == [17, 503]
    assert_distribution(draw_counts(row, 10_000, **params), expected)


def test_default_chain() -> None:
    row = peaked_row()
    p = SamplingParams()
    params = dict(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p)
    expected = reference_dist(row, **params)  # type: ignore[arg-type]
    assert np.count_nonzero(expected) == 5
    assert_distribution(draw_counts(row, 10_000, seed=7, **params), expected)


def test_top_p_comes_before_min_p() -> None:
    # p = 0.5, 0.3, 0.1, tail 0.1 over 997 tokens.  llama.cpp: top_p=0.85 keeps
    # {0.5, 0.3, 0.1} (cumulative 0.9), then min_p=0.1 (>= 0.05) keeps all three.
    # Cutting min-p first leaves mass 0.9; 0.85 * 0.9 = 0.765 is reached by two tokens.
    p = np.full(V, 0.1 / (V - 3))
    p[[10, 20, 30]] = [0.5, 0.3, 0.1]
    row = np.log(p).astype(np.float32)
    params = dict(temperature=1.0, top_k=0, top_p=0.85, min_p=0.1)
    expected = reference_dist(row, **params)  # type: ignore[arg-type]
    np.testing.assert_allclose(expected[[10, 20, 30]], [5 / 9, 3 / 9, 1 / 9], rtol=1e-6)
    assert_distribution(draw_counts(row, 10_000, seed=8, **params), expected)


# -- logit bias -------------------------------------------------------------------------


def test_logit_bias_minus_inf_bans_a_token() -> None:
    logits = np.random.default_rng(9).standard_normal((3, V)).astype(np.float32)
    order = np.argsort(-logits, axis=1)
    best, second = order[:, 0], order[:, 1]
    reqs = [
        make_req(0, temperature=0.0, logit_bias=((int(best[0]), float("-inf")),)),
        make_req(1, temperature=1.0, top_k=1, logit_bias=((int(best[1]), float("-inf")),)),
        make_req(2, temperature=0.0),  # no bias: unaffected by its neighbours' biases
    ]
    assert sample(logits.copy(), [0, 1, 2], reqs) == [int(second[0]), int(second[1]), int(best[2])]


def test_logit_bias_minus_inf_never_sampled() -> None:
    row = peaked_row()
    counts = draw_counts(
        row,
        5_000,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        min_p=0.2,
        logit_bias=((17, float("-inf")),),
    )
    row2 = row.copy()
    row2[17] = -np.inf
    expected = reference_dist(row2, temperature=1.0, top_k=0, top_p=1.0, min_p=0.2)
    assert counts[17] == 0
    # The new maximum is 0.25: min_p keeps p >= 0.05, so 0.06 now survives.
    assert sorted(np.flatnonzero(expected).tolist()) == [2, 250, 503, 999]
    assert_distribution(counts, expected)


def test_logit_bias_large_positive_forces_a_token() -> None:
    logits = np.random.default_rng(10).standard_normal((4, V)).astype(np.float32)
    worst = logits.argmin(axis=1)
    for seed in range(25):
        reqs = [
            make_req(seed, temperature=0.0, logit_bias=((int(worst[0]), 100.0),)),
            make_req(seed, temperature=1.0, logit_bias=((int(worst[1]), 100.0),)),
            make_req(
                seed,
                temperature=5.0,
                top_k=0,
                top_p=1.0,
                min_p=0.0,
                logit_bias=((int(worst[2]), 100.0),),
            ),
            make_req(seed, temperature=0.0),
        ]
        got = sample(logits.copy(), [0, 1, 2, 3], reqs)
        assert got == [int(worst[0]), int(worst[1]), int(worst[2]), int(logits[3].argmax())]


def test_logit_bias_is_additive_and_ignores_out_of_vocab_ids() -> None:
    logits = np.arange(12, dtype=np.float32).reshape(2, 6)
    before = logits.copy()
    req = make_req(0, logit_bias=((1, 2.5), (4, -0.5), (6, 1.0), (10_000, -1.0)))
    apply_bias_and_penalties(logits, [1], [req])
    expected = before.copy()
    expected[1, 1] += 2.5
    expected[1, 4] -= 0.5
    np.testing.assert_array_equal(logits, expected)


# -- penalties ---------------------------------------------------------------------------

# Prompt [3, 7, 7]; generated [3, 5, 3, 11]: token 3 twice, 5 and 11 once; 7 only
# in the prompt (penalties look at generated tokens only).
PROMPT = [3, 7, 7]
GENERATED = [3, 5, 3, 11]


def penalized_row(**params: object) -> tuple[np.ndarray, np.ndarray]:
    logits = np.zeros((2, 16), dtype=np.float32)
    logits[1, 3] = 3.0
    logits[1, 5] = -1.5
    logits[1, 7] = 2.0
    logits[1, 11] = 0.0
    logits[1, 12] = 4.0
    logits[0] = 9.0
    before = logits.copy()
    req = make_req(0, tokens=PROMPT + GENERATED, num_prompt=len(PROMPT), **params)
    apply_bias_and_penalties(logits, [1], [req])
    return before, logits


@pytest.mark.parametrize(
    ("params", "changes"),
    [
        # repeat: divide positive logits, multiply non-positive ones
        ({"repeat_penalty": 1.5}, {3: 3.0 / 1.5, 5: -1.5 * 1.5, 11: 0.0}),
        ({"repeat_penalty": 0.5}, {3: 3.0 / 0.5, 5: -1.5 * 0.5, 11: 0.0}),
        # presence: minus once per distinct token
        ({"presence_penalty": 0.5}, {3: 2.5, 5: -2.0, 11: -0.5}),
        ({"presence_penalty": -1.0}, {3: 4.0, 5: -0.5, 11: 1.0}),
        # frequency: minus count times the penalty
        ({"frequency_penalty": 0.25}, {3: 2.5, 5: -1.75, 11: -0.25}),
        # all three: repeat first, then presence + count * frequency
        (
            {"repeat_penalty": 1.5, "presence_penalty": 0.5, "frequency_penalty": 0.25},
            {3: 2.0 - 0.5 - 0.5, 5: -2.25 - 0.5 - 0.25, 11: 0.0 - 0.5 - 0.25},
        ),
    ],
)
def test_penalties_change_exactly_the_generated_tokens(
    params: dict[str, float], changes: dict[int, float]
) -> None:
    before, after = penalized_row(**params)
    expected = before.copy()
    for tok, val in changes.items():
        expected[1, tok] = val
    np.testing.assert_array_equal(after, expected)


def test_penalties_window_is_last_n_generated() -> None:
    # repeat_last_n=2 sees only [3, 11] of the generated [3, 5, 3, 11]: count of 3 is 1.
    before, after = penalized_row(frequency_penalty=0.5, repeat_last_n=2)
    expected = before.copy()
    expected[1, 3] = 2.5
    expected[1, 11] = -0.5
    np.testing.assert_array_equal(after, expected)


def test_no_penalty_without_generated_tokens_or_window() -> None:
    logits = np.ones((1, 16), dtype=np.float32)
    req = make_req(0, tokens=[3, 4, 5], num_prompt=3, repeat_penalty=2.0, presence_penalty=1.0)
    apply_bias_and_penalties(logits, [0], [req])
    req = make_req(0, tokens=[3, 4, 5], num_prompt=0, presence_penalty=1.0, repeat_last_n=0)
    apply_bias_and_penalties(logits, [0], [req])
    np.testing.assert_array_equal(logits, np.ones((1, 16), dtype=np.float32))


def test_penalty_changes_the_greedy_choice() -> None:
    logits = np.zeros((1, 16), dtype=np.float32)
    logits[0, 4] = 2.0  # generated twice before
    logits[0, 9] = 1.2
    req = make_req(0, tokens=[1, 4, 4], num_prompt=1, temperature=0.0, frequency_penalty=0.5)
    assert sample(logits, [0], [req]) == [9]  # 2.0 - 2 * 0.5 = 1.0 < 1.2


# -- per-request random streams --------------------------------------------------------


def flat_logits(n_rows: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n_rows, V)) * 0.5).astype(np.float32)


FULL = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)


def run_alone(seed: int, row: np.ndarray, steps: int) -> list[int]:
    req = make_req(seed, **FULL)  # type: ignore[arg-type]
    return [sample(row[None].copy(), [0], [req])[0] for _ in range(steps)]


def test_same_seed_same_draws_regardless_of_batch() -> None:
    row = flat_logits(1, 11)[0]
    alone = run_alone(42, row, 30)
    # The same request in bigger batches: other sampled and greedy rows around it,
    # at different row positions, in a different order every step.
    others = flat_logits(6, 12)
    req = make_req(42, **FULL)  # type: ignore[arg-type]
    other_reqs = [make_req(100 + i, **FULL) for i in range(3)]  # type: ignore[arg-type]
    other_reqs += [make_req(200 + i, temperature=0.0) for i in range(2)]
    perm_rng = np.random.default_rng(13)
    together = []
    for _ in range(30):
        reqs = [req, *other_reqs]
        perm = perm_rng.permutation(len(reqs))
        block = np.vstack([others, row[None]])  # row 6 is `row`
        rows = [6 if r is req else int(i) for i, r in enumerate(reqs)]
        reqs = [reqs[i] for i in perm]
        rows = [rows[i] for i in perm]
        out = sample(block, rows, reqs)
        together.append(out[reqs.index(req)])
    assert together == alone
    assert len(set(alone)) > 10  # a real random stream over a flat distribution


def test_different_seeds_differ() -> None:
    row = flat_logits(1, 14)[0]
    draws = {seed: run_alone(seed, row, 20) for seed in range(5)}
    assert len({tuple(d) for d in draws.values()}) == 5
    assert draws[3] == run_alone(3, row, 20)


# -- the model's vocabulary size ------------------------------------------------------
# How fast the sampler is at this size is measured by benchmarks/bench_sampler.py;
# these tests check that its candidate cut loses nothing the chain keeps.

BIG_V = 262_144
BIG_PARAMS = [
    SamplingParams(),
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=1.5, top_k=0, top_p=1.0, min_p=0.05),
    SamplingParams(temperature=0.7, top_k=20, top_p=0.9, min_p=0.1),
]


def big_logits() -> np.ndarray:
    """LLM-like rows: a broad bulk and a few tokens far above it."""
    rng = np.random.default_rng(15)
    logits = (rng.standard_normal((16, BIG_V)) * 2.5).astype(np.float32)
    for r in range(16):
        logits[r, rng.choice(BIG_V, 5, replace=False)] += 15.0
    return logits


@pytest.mark.parametrize("params", BIG_PARAMS, ids=["defaults", "greedy", "min_p_only", "all_cuts"])
def test_262k_vocab_draws_stay_in_the_chain_support(params: SamplingParams) -> None:
    logits = big_logits()
    if params.greedy:
        support = [logits[r] == logits[r].max() for r in range(16)]
    else:
        cuts = dict(top_k=params.top_k, top_p=params.top_p, min_p=params.min_p)
        support = [reference_dist(logits[r], temperature=params.temperature, **cuts) > 0
                   for r in range(16)]  # fmt: skip
    fields = {k: v for k, v in vars(params).items() if k != "seed"}  # the stream is make_req's
    reqs = [make_req(i, **fields) for i in range(16)]
    drawn = [sample(logits.copy(), list(range(16)), reqs) for _ in range(20)]
    for toks in drawn:
        assert all(support[r][t] for r, t in enumerate(toks)), toks
    if not params.greedy:
        assert len({tuple(t) for t in drawn}) > 1  # it does draw


def test_262k_vocab_plain_temperature_keeps_the_tail() -> None:
    """No truncation: five tokens far above a broad bulk of 262,139 that still holds
    about 40% of the mass; draws follow the full softmax (the five and "any other" as
    six bins), so a cut that dropped the tail would show."""
    row = (np.random.default_rng(16).standard_normal(BIG_V) * 2.5).astype(np.float32)
    head = np.array([11, 2_000, 77_777, 150_000, 262_000])
    row[head] = [15.0, 14.5, 14.0, 13.5, 13.0]
    p = softmax64(row)
    expected = np.append(p[head], 1 - p[head].sum())
    assert 0.2 < expected[-1] < 0.6
    reqs = [make_req(i, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) for i in range(16)]
    block = np.tile(row, (16, 1))
    counts = np.zeros(6, dtype=np.int64)
    for _ in range(60):
        for t in sample(block.copy(), list(range(16)), reqs):
            hit = np.flatnonzero(head == t)
            counts[hit[0] if hit.size else 5] += 1
    assert_distribution(counts, expected)
