"""Token log-probabilities in OpenAI's two shapes.

Completions: per choice, parallel lists `tokens`, `token_logprobs`, `top_logprobs`
(a `{token: logprob}` dict per position) and `text_offset` (where each token starts
in the choice's text).  Chat: a `content` list of `{token, logprob, bytes,
top_logprobs}`.  A token whose bytes are not valid UTF-8 on their own (part of a
character) is written with backslash escapes; `bytes` always holds the raw bytes.
"""

from __future__ import annotations

import codecs
import math
from collections.abc import Sequence
from typing import Any

from llamba_cli.engine import TokenLogprob

# OpenAI's stand-in for "very unlikely": JSON has no -Infinity.
_FLOOR = -9999.0


def token_string(piece: bytes) -> str:
    return piece.decode("utf-8", "backslashreplace")


def _value(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else _FLOOR


class CompletionLogprobs:
    """Builds the completions-shape logprobs of one choice, a few tokens at a time
    (streaming sends each piece as it comes; a whole response sends one)."""

    def __init__(self, offset: int = 0) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._offset = offset  # characters of the choice's text before the next token

    def add(self, items: Sequence[TokenLogprob]) -> dict[str, Any]:
        tokens: list[str] = []
        values: list[float] = []
        tops: list[dict[str, float]] = []
        offsets: list[int] = []
        for item in items:
            text = token_string(item.text)
            offsets.append(self._offset)
            self._offset += len(self._decoder.decode(item.text))
            tokens.append(text)
            values.append(_value(item.logprob))
            top = {token_string(piece): _value(lp) for _, piece, lp in item.top}
            tops.append(top or {text: _value(item.logprob)})
        return {
            "tokens": tokens,
            "token_logprobs": values,
            "top_logprobs": tops,
            "text_offset": offsets,
        }


def chat_logprobs(items: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    """The chat-shape `content` entries for `items`."""
    return [
        {
            "token": token_string(item.text),
            "logprob": _value(item.logprob),
            "bytes": list(item.text),
            "top_logprobs": [
                {"token": token_string(piece), "logprob": _value(lp), "bytes": list(piece)}
                for _, piece, lp in item.top
            ],
        }
        for item in items
    ]
