"""An OpenAI request body's sampling fields as the engine's `SamplingParams`.

`sampling_params` gives one choice's parameters: OpenAI's defaults where a field is
absent, llama.cpp's extras (top_k, min_p, repeat_penalty, ...) off unless given, and
an `InvalidRequest` naming the field when a value cannot be used.  `grammar_for`
turns `response_format` or the `grammar` / `json_schema` extras into GBNF.  Choice i
of a seeded request draws from `choice_seed(seed, i)`, so the same body gives the
same choices whatever else is running.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import orjson

from llamba_cli.engine import SamplingParams, schema_to_gbnf
from llamba_cli.errors import ConfigError
from llamba_cli.openai.errors import InvalidRequest
from llamba_cli.openai.schemas import SamplingBody
from llamba_cli.openai.served import ServedModel

_SEED_MASK = (1 << 63) - 1


def choice_seed(seed: int | None, index: int) -> int | None:
    """Choice `index`'s seed: `seed` itself for the first, a hash of (seed, index) after."""
    if seed is None:
        return None
    if index == 0:
        return seed & _SEED_MASK
    digest = hashlib.blake2b(f"{seed}\0{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _SEED_MASK


@lru_cache(maxsize=64)
def _schema_grammar(schema_json: str) -> str:
    return schema_to_gbnf(schema_json)


def grammar_for(body: SamplingBody) -> str | None:
    """GBNF for `response_format` (json_object, json_schema) or llama.cpp's `grammar` /
    `json_schema` extras; InvalidRequest naming the field when it cannot be enforced."""
    given: list[tuple[str, Any]] = []
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        given.append(("response_format", {"type": "object"}))
    elif fmt is not None and fmt.type == "json_schema":
        assert fmt.json_schema is not None
        given.append(("response_format.json_schema.schema", fmt.json_schema.schema_))
    if body.json_schema is not None:
        given.append(("json_schema", body.json_schema))
    if body.grammar is not None:
        given.append(("grammar", body.grammar))
    if not given:
        return None
    if len(given) > 1:
        names = " and ".join(name for name, _ in given)
        raise InvalidRequest(f"give one output constraint, not {names}", param=given[1][0])
    param, value = given[0]
    if param == "grammar":
        if not value.strip():
            raise InvalidRequest("grammar: the grammar is empty", param=param)
        return str(value)
    try:
        return _schema_grammar(orjson.dumps(value).decode())
    except ConfigError as e:
        raise InvalidRequest(f"{param}: {e}", param=param) from None


def _stops(body: SamplingBody, extra: Sequence[str] = ()) -> tuple[str, ...]:
    stop = body.stop
    given = [stop] if isinstance(stop, str) else list(stop or ())
    if any(not s for s in given):
        raise InvalidRequest("stop: stop strings must not be empty", param="stop")
    return tuple(dict.fromkeys([*given, *extra]))


def _logit_bias(body: SamplingBody, n_vocab: int) -> tuple[tuple[int, float], ...]:
    out: list[tuple[int, float]] = []
    for key, bias in (body.logit_bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            token = -1
        if not 0 <= token < n_vocab:
            raise InvalidRequest(
                f"logit_bias: {key!r} is not a token id of this model (0..{n_vocab - 1})",
                param="logit_bias",
            )
        if not -100 <= bias <= 100:
            raise InvalidRequest(
                f"logit_bias: the bias of token {token} must be within [-100, 100]",
                param="logit_bias",
            )
        out.append((token, bias))
    return tuple(out)


def sampling_params(
    body: SamplingBody,
    served: ServedModel,
    *,
    max_tokens: int,
    seed: int | None,
    logprobs: int | None,
    extra_stop: Sequence[str] = (),
) -> SamplingParams:
    """The engine's parameters for one choice. Absent fields take OpenAI's defaults
    (temperature 1, top_p 1) and llama.cpp's extras are off unless given."""
    defaults = SamplingParams()
    try:
        return SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_k=0 if body.top_k is None or body.top_k < 0 else body.top_k,
            top_p=1.0 if body.top_p is None else body.top_p,
            min_p=0.0 if body.min_p is None else body.min_p,
            repeat_penalty=1.0 if body.repeat_penalty is None else body.repeat_penalty,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            repeat_last_n=(
                defaults.repeat_last_n if body.repeat_last_n is None else body.repeat_last_n
            ),
            max_tokens=max_tokens,
            stop=_stops(body, extra_stop),
            logit_bias=_logit_bias(body, served.n_vocab),
            seed=seed,
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
        )
    except InvalidRequest:
        raise
    except ConfigError as e:  # pydantic checked the ranges; this is a safety net
        raise InvalidRequest(str(e)) from None
