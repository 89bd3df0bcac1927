"""llama-cpp-python's `Llama` as the reference llamba is measured against, for the
benchmarks and the tests (`tests/conftest.py` imports it as `benchmarks.reference`).

- `load_llama` builds a `Llama` whose weights are laid out as llamba lays them out:
  on CPUs where llama.cpp's AMX path crashes llamba loads models without the extra
  CPU buffer types, and `Llama` has no argument for that.
- `Reference` drives one `Llama` sequence decode by decode, so that a comparison that
  claims "the same computation" really runs the same `llama_decode` calls as llamba
  at one slot, and so that llama.cpp's own batch-shape noise can be measured: the
  same tokens evaluated in one decode or split into several.

Importing this module has no side effects: llama-cpp-python and llamba are imported
inside the functions that need them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# How a sequence is split into decodes: None (one decode), "halves", or chunks of that
# many tokens.
Shape = str | int | None

# The splits that measure llama.cpp's own noise: in halves, one token a decode (the
# matrix-vector kernels of a decode step), chunks of 4 and 5 tokens (the tiled
# kernels, with and without a ragged tail).
SHAPES: tuple[Shape, ...] = ("halves", 1, 4, 5)


def repack_supported() -> bool:
    """llamba's own answer: False on CPUs where llama.cpp's repack/AMX path crashes."""
    from llamba_cli.engine.llama import repack_supported as supported

    return supported()


@contextlib.contextmanager
def extra_bufts_disabled(disable: bool | None = None) -> Iterator[bool]:
    """Make `llama_model_default_params()` return `use_extra_bufts=False` while active.

    `Llama.__init__` takes its model params from
    `llama_cpp.llama_cpp.llama_model_default_params()` and has no argument for
    weight repacking; on CPUs with AMX, llama.cpp's repacked (AMX) path crashes on
    Q4_K models, and llamba turns it off there.  `disable=None` follows llamba
    (`repack_supported()`); the context manager yields whether it disabled them.
    """
    import llama_cpp
    import llama_cpp.llama_cpp as lc

    if disable is None:
        disable = not repack_supported()
    if not disable:
        yield False
        return
    original = lc.llama_model_default_params
    original_pkg = getattr(llama_cpp, "llama_model_default_params", original)

    def patched() -> Any:
        params = original()
        params.use_extra_bufts = False
        return params

    lc.llama_model_default_params = patched
    llama_cpp.llama_model_default_params = patched
    try:
        yield True
    finally:
        lc.llama_model_default_params = original
        llama_cpp.llama_model_default_params = original_pkg


def load_llama(model_path: str | Path, **kwargs: Any) -> Any:
    """`llama_cpp.Llama(model_path, **kwargs)`, built without extra buffer types when
    llamba would also load the model without them."""
    from llama_cpp import Llama

    with extra_bufts_disabled():
        return Llama(model_path=str(model_path), **kwargs)


def log_softmax(row: np.ndarray) -> np.ndarray:
    """log softmax of one logits row, in float64."""
    x = np.asarray(row, dtype=np.float64)
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))


def pieces(tokens: Sequence[int], shape: Shape) -> list[list[int]]:
    """`tokens` split into the decodes `shape` names."""
    toks = list(tokens)
    if shape is None:
        return [toks]
    if shape == "halves":
        half = len(toks) // 2
        return [toks[:half], toks[half:]]
    if not isinstance(shape, int) or shape < 1:
        raise ValueError(f"not a shape: {shape!r}")
    return [toks[i : i + shape] for i in range(0, len(toks), shape)]


class Reference:
    """One `Llama` sequence, one `llama_decode` per `eval` call, logits of the last
    token of each decode only (as llamba asks for them).

    Build the `Llama` with llamba's context settings (`n_ctx`, `n_batch` = `n_ubatch`,
    threads, `flash_attn`, `swa_full=True`) for results equal to llamba's at one slot.
    Every method starts from an empty KV cache (`reset()`), except `extend`: `Llama`
    otherwise keeps the previous prompt's KV and evaluates only what follows the
    common prefix, which is a different batch shape and so different numerics.
    """

    def __init__(self, llm: Any) -> None:
        import llama_cpp

        self.llm = llm
        self._logits_ith = llama_cpp.llama_get_logits_ith
        self.n_vocab: int = llm.n_vocab()

    def tokenize(self, text: str) -> list[int]:
        """Tokens as llamba tokenizes a prompt (BOS, special tokens parsed)."""
        return list(self.llm.tokenize(text.encode(), add_bos=True, special=True))

    def _last_row(self) -> np.ndarray:
        ptr = self._logits_ith(self.llm.ctx, -1)
        return log_softmax(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)))

    def logprobs(self, tokens: Sequence[int], shape: Shape = None) -> np.ndarray:
        """log P(next token | tokens) over the vocabulary, `tokens` evaluated from an
        empty cache in the decodes `shape` names (default: one)."""
        self.llm.reset()
        for piece in pieces(tokens, shape):
            self.llm.eval(piece)
        return self._last_row()

    def extend(self, tokens: Sequence[int]) -> np.ndarray:
        """Evaluate `tokens` in one decode after what is already evaluated."""
        self.llm.eval(list(tokens))
        return self._last_row()

    def rewind(self, n: int) -> None:
        """Keep only the first `n` evaluated tokens (the next `extend` drops the rest of
        the KV cache, as llamba does before a label branch)."""
        if not 0 <= n <= self.llm.n_tokens:
            raise ValueError(f"cannot rewind to {n} of {self.llm.n_tokens} tokens")
        self.llm.n_tokens = n

    def greedy(self, tokens: Sequence[int], n: int) -> list[int]:
        """`n` greedy tokens after `tokens`, one decode a token (llamba at one slot)."""
        out: list[int] = []
        row = self.logprobs(tokens)
        for _ in range(n):
            out.append(int(row.argmax()))
            row = self.extend(out[-1:])
        return out

    def greedy_gaps(self, prompt: Sequence[int], generated: Sequence[int]) -> np.ndarray:
        """For each generated token: how far (nats) its log-probability lies below the
        best token's, teacher-forced one decode a token; 0 where it is the argmax."""
        gaps = []
        row = self.logprobs(prompt)
        for tok in generated:
            gaps.append(float(row.max() - row[tok]))
            row = self.extend([tok])
        return np.array(gaps)

    def label_logprobs(
        self, prompt: str, labels: Sequence[str], shape: Shape = None, delimiter: str = " "
    ) -> list[float]:
        """log P(label | prompt) per label, the slow, obvious way: the prompt evaluated
        from an empty cache (in the decodes `shape` names), then per label its first
        token in a decode of its own after the prompt, log-softmax summed over the
        label's tokens. Labels are tokenized together with the prompt, and the
        context is what every labelled text shares, as llamba does. The decodes are
        llamba's at one slot for labels of one or two tokens (llamba evaluates each
        inner node of the label trie in one decode; longer labels are refused)."""
        delim = "" if not prompt or prompt[-1].isspace() else delimiter
        ptoks = self.tokenize(prompt)
        fulls = [self.tokenize(prompt + delim + label) for label in labels]
        ctx = len(ptoks)
        for full in fulls:
            same = next(
                (i for i, (a, b) in enumerate(zip(ptoks, full, strict=False)) if a != b),
                min(len(ptoks), len(full)),
            )
            ctx = min(ctx, same, len(full) - 1)
        first = self.logprobs(fulls[0][:ctx], shape)  # the context is the same for all
        out = []
        for label, full in zip(labels, fulls, strict=True):
            if len(full) - ctx > 2:
                raise ValueError(f"label {label!r} has more than two tokens after the prompt")
            total = float(first[full[ctx]])
            if len(full) - ctx == 2:
                self.rewind(ctx)
                total += float(self.extend([full[ctx]])[full[ctx + 1]])
            out.append(total)
        return out

    def shape_noise(
        self,
        sequences: Sequence[Sequence[int]],
        read: Callable[[Sequence[int], Shape], np.ndarray],
        shapes: Sequence[Shape] = SHAPES,
    ) -> float:
        """llama.cpp's own batch-shape noise: the largest change of `read(seq, shape)`
        (log-probabilities) from the one-decode evaluation to each of `shapes`."""
        worst = 0.0
        for seq in sequences:
            whole = read(seq, None)
            for shape in shapes:
                worst = max(worst, float(np.abs(read(seq, shape) - whole).max()))
        return worst

    def top_noise(
        self, sequences: Sequence[Sequence[int]], k: int = 2, shapes: Sequence[Shape] = SHAPES
    ) -> float:
        """`shape_noise` of the `k` tokens most likely after each sequence: the
        log-probabilities a greedy choice hangs on."""
        worst = 0.0
        for seq in sequences:
            whole = self.logprobs(seq)
            top = np.argsort(-whole)[:k]
            for shape in shapes:
                row = self.logprobs(seq, shape)
                worst = max(worst, float(np.abs(row[top] - whole[top]).max()))
        return worst
