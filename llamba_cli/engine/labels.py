"""Exact label scoring: log P(label tokens | context), summed over every label token.

The context's last logits row scores every label's first token, so a label set of
single tokens costs nothing beyond the prompt.  Longer labels need logits after
each of their proper prefixes (the *internal nodes* of the label trie).  Those are
evaluated as depth-first paths in the request's own sequence: evaluate a path,
rewind the KV to where the next path branches off, evaluate the rest.  Visiting
leaves in lexicographic order means every internal node, and so every token that
labels share ("very good" / "very bad" share "very"), is evaluated exactly once.
"""

from __future__ import annotations

import numpy as np

Prefix = tuple[int, ...]


def log_softmax_at(row: np.ndarray, tokens: list[int]) -> list[float]:
    """log softmax(row)[tokens], computed in float64 for the normalizer."""
    m = float(row.max())
    lse = m + float(np.log(np.exp(row - m, dtype=np.float64).sum()))
    return [float(row[t]) - lse for t in tokens]


class LabelScorer:
    """Collects the logits rows a label set needs and sums them per label.

    `label_tokens[i]` are label i's tokens as they follow the context (non-empty).
    Protocol: `observe(prefix, row)` for the context's last row (prefix `()`) and for
    each internal node; `next_path()` says which tokens to evaluate next.
    """

    def __init__(self, label_tokens: list[list[int]]) -> None:
        if not label_tokens or any(not t for t in label_tokens):
            raise ValueError("every label needs at least one token")
        self.label_tokens = [list(t) for t in label_tokens]
        # For each prefix (trie node), which next tokens some label needs from it.
        self._needs: dict[Prefix, list[int]] = {}
        for toks in self.label_tokens:
            for j, tok in enumerate(toks):
                nxt = self._needs.setdefault(tuple(toks[:j]), [])
                if tok not in nxt:
                    nxt.append(tok)
        internal = [q for q in self._needs if q]
        leaves = sorted(
            q for q in internal if not any(len(o) > len(q) and o[: len(q)] == q for o in internal)
        )
        self._paths: list[tuple[int, list[int]]] = []
        prev: Prefix = ()
        for leaf in leaves:
            branch = _common_prefix_len(prev, leaf)
            self._paths.append((branch, list(leaf[branch:])))
            prev = leaf
        self._next = 0
        self._logp: dict[tuple[Prefix, int], float] = {}

    @property
    def extra_tokens(self) -> int:
        """Tokens evaluated beyond the context: one per internal trie node."""
        return sum(len(toks) for _, toks in self._paths)

    def observe(self, prefix: Prefix, row: np.ndarray) -> None:
        """Record the next-token distribution after `prefix` (label tokens so far)."""
        wanted = self._needs.get(prefix)
        if wanted:
            for tok, lp in zip(wanted, log_softmax_at(row, wanted), strict=True):
                self._logp[(prefix, tok)] = lp

    def next_path(self) -> tuple[int, list[int]] | None:
        """(label tokens to keep, label tokens to append) for the next path, or None
        when every needed row has been observed."""
        if self._next >= len(self._paths):
            return None
        path = self._paths[self._next]
        self._next += 1
        return path

    def logprobs(self) -> list[float]:
        """log P(label | context) per label, in label order."""
        return [
            sum(self._logp[(tuple(toks[:j]), tok)] for j, tok in enumerate(toks))
            for toks in self.label_tokens
        ]


def _common_prefix_len(a: Prefix, b: Prefix) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def normalize(logprobs: list[float]) -> list[float]:
    """Probabilities over the label set from per-label log-probabilities."""
    lp = np.asarray(logprobs, dtype=np.float64)
    p = np.exp(lp - lp.max())
    return (p / p.sum()).tolist()
