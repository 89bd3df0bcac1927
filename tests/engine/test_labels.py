"""`LabelScorer` on hand-made logits rows, driven the way the engine drives it."""

from __future__ import annotations

import numpy as np
import pytest

from llamba_cli.engine.labels import LabelScorer, log_softmax_at, normalize

V = 64


def log_softmax64(row: np.ndarray) -> np.ndarray:
    x = row.astype(np.float64)
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))


def rows_for(
    labels: list[list[int]], seed: int, *, dyadic: bool = False
) -> dict[tuple, np.ndarray]:
    """One logits row per trie node (every proper prefix of a label, `()` included)."""
    rng = np.random.default_rng(seed)
    prefixes = {tuple(t[:j]) for t in labels for j in range(len(t))}
    rows = {}
    for q in sorted(prefixes):
        if dyadic:  # multiples of 1/8: float32 differences are exact
            rows[q] = (rng.integers(-64, 64, V) / 8).astype(np.float32)
        else:
            rows[q] = (rng.standard_normal(V) * 3).astype(np.float32)
    return rows


def drive(scorer: LabelScorer, rows: dict[tuple, np.ndarray]) -> tuple[list, list[tuple]]:
    """The engine's protocol: observe the context's last row, then evaluate each path
    (keep `keep` label tokens, append the rest), observing the row after each new token."""
    scorer.observe((), rows[()])
    cur: list[int] = []
    paths = []
    evaluated: list[tuple] = []
    while (nxt := scorer.next_path()) is not None:
        keep, branch = nxt
        paths.append((keep, list(branch)))
        assert keep <= len(cur)
        cur = cur[:keep] + list(branch)
        for j in range(keep, len(cur)):
            prefix = tuple(cur[: j + 1])
            evaluated.append(prefix)
            scorer.observe(prefix, rows[prefix])
    return paths, evaluated


def reference_logprobs(labels: list[list[int]], rows: dict[tuple, np.ndarray]) -> list[float]:
    return [
        float(sum(log_softmax64(rows[tuple(t[:j])])[tok] for j, tok in enumerate(t)))
        for t in labels
    ]


def internal_nodes(labels: list[list[int]]) -> set[tuple]:
    return {tuple(t[:j]) for t in labels for j in range(1, len(t))}


def test_single_token_labels_need_no_paths() -> None:
    labels = [[3], [8], [1], [40]]
    scorer = LabelScorer(labels)
    assert scorer.extra_tokens == 0
    rows = rows_for(labels, 0)
    scorer.observe((), rows[()])
    assert scorer.next_path() is None
    ls = log_softmax64(rows[()])
    np.testing.assert_allclose(scorer.logprobs(), ls[[3, 8, 1, 40]], rtol=0, atol=1e-6)


def test_shared_first_token_is_evaluated_once() -> None:
    labels = [[5, 7], [5, 9]]  # "very good" / "very bad"
    scorer = LabelScorer(labels)
    assert scorer.extra_tokens == 1
    rows = rows_for(labels, 1)
    paths, evaluated = drive(scorer, rows)
    assert paths == [(0, [5])]
    assert evaluated == [(5,)]
    lp = scorer.logprobs()
    ls0, ls5 = log_softmax64(rows[()]), log_softmax64(rows[(5,)])
    np.testing.assert_allclose(lp, [ls0[5] + ls5[7], ls0[5] + ls5[9]], rtol=0, atol=1e-6)


def test_label_that_is_a_prefix_of_another() -> None:
    labels = [[5], [5, 7]]
    scorer = LabelScorer(labels)
    assert scorer.extra_tokens == 1
    rows = rows_for(labels, 2)
    paths, evaluated = drive(scorer, rows)
    assert paths == [(0, [5])]
    assert evaluated == [(5,)]
    ls0, ls5 = log_softmax64(rows[()]), log_softmax64(rows[(5,)])
    np.testing.assert_allclose(scorer.logprobs(), [ls0[5], ls0[5] + ls5[7]], rtol=0, atol=1e-6)
    assert scorer.logprobs()[1] < scorer.logprobs()[0]


def test_deeper_trie_paths_in_lexicographic_order() -> None:
    labels = [[5, 7, 1], [6, 2], [5, 9, 2], [4], [5, 7, 3], [5, 7, 1, 8]]
    scorer = LabelScorer(labels)
    # internal nodes: (5,), (5,7), (5,7,1), (5,9), (6,)
    assert internal_nodes(labels) == {(5,), (5, 7), (5, 7, 1), (5, 9), (6,)}
    assert scorer.extra_tokens == 5
    rows = rows_for(labels, 3)
    paths, evaluated = drive(scorer, rows)
    assert paths == [(0, [5, 7, 1]), (1, [9]), (0, [6])]
    assert evaluated == [(5,), (5, 7), (5, 7, 1), (5, 9), (6,)]
    np.testing.assert_allclose(
        scorer.logprobs(), reference_logprobs(labels, rows), rtol=0, atol=1e-5
    )


@pytest.mark.parametrize("seed", range(10))
def test_random_label_sets_evaluate_each_internal_node_once(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    labels = [rng.integers(0, 4, rng.integers(1, 5)).tolist() for _ in range(rng.integers(2, 9))]
    scorer = LabelScorer(labels)
    rows = rows_for(labels, seed)
    _, evaluated = drive(scorer, rows)
    assert sorted(evaluated) == sorted(internal_nodes(labels))
    assert len(evaluated) == len(set(evaluated)) == scorer.extra_tokens
    np.testing.assert_allclose(
        scorer.logprobs(), reference_logprobs(labels, rows), rtol=0, atol=1e-5
    )


def test_logprobs_exact_on_dyadic_rows() -> None:
    labels = [[1, 2, 3], [1, 2, 4], [1, 5], [6], [1, 2]]
    scorer = LabelScorer(labels)
    rows = rows_for(labels, 4, dyadic=True)
    drive(scorer, rows)
    np.testing.assert_allclose(
        scorer.logprobs(), reference_logprobs(labels, rows), rtol=1e-12, atol=1e-12
    )


def test_duplicate_labels_get_the_same_score() -> None:
    labels = [[2, 3], [2, 3], [2]]
    scorer = LabelScorer(labels)
    assert scorer.extra_tokens == 1
    rows = rows_for(labels, 5)
    drive(scorer, rows)
    lp = scorer.logprobs()
    assert lp[0] == lp[1]
    np.testing.assert_allclose(lp, reference_logprobs(labels, rows), rtol=0, atol=1e-6)


def test_label_probabilities_of_all_continuations_sum_to_one() -> None:
    # Every single-token continuation of the context: probabilities sum to 1.
    labels = [[t] for t in range(V)]
    scorer = LabelScorer(labels)
    drive(scorer, rows_for(labels, 6))
    assert np.exp(scorer.logprobs()).sum() == pytest.approx(1.0, abs=1e-9)


def test_log_softmax_at_against_float64() -> None:
    row = (np.random.default_rng(7).standard_normal(262_144) * 4).astype(np.float32)
    toks = [0, 17, int(row.argmax()), int(row.argmin()), 262_143]
    np.testing.assert_allclose(
        log_softmax_at(row, toks), log_softmax64(row)[toks], rtol=0, atol=1e-6
    )


def test_empty_labels_are_rejected() -> None:
    with pytest.raises(ValueError):
        LabelScorer([])
    with pytest.raises(ValueError):
        LabelScorer([[1], []])


def test_normalize_is_softmax_over_labels() -> None:
    lp = [-0.5, -2.25, -7.0, -1.0]
    p = normalize(lp)
    x = np.array(lp)
    expected = np.exp(x) / np.exp(x).sum()
    np.testing.assert_allclose(p, expected, rtol=1e-12)
    assert sum(p) == pytest.approx(1.0, abs=1e-12)


def test_normalize_handles_very_negative_logprobs() -> None:
    p = normalize([-1000.0, -1001.0, -1000.0])
    e = np.exp([0.0, -1.0, 0.0])
    np.testing.assert_allclose(p, e / e.sum(), rtol=1e-12)
    assert sum(p) == pytest.approx(1.0, abs=1e-12)
