"""One API call: a validated body, the engine `Request`s it becomes, and its response.

    call = api.call("/v1/chat/completions", body)      # InvalidRequest if the body is bad
    for req in engine.run(call.requests): ...          # or EngineLoop.submit each one
    body = call.response()                             # ApiError if a request failed

Streaming takes the same call: `stream_start()`, then `stream_chunks(output)` for each
`RequestOutput` as the engine produces it, then `stream_end()`; the chunks are the
`data:` payloads of OpenAI's server-sent events.  Nothing here does I/O, so the
server and `llamba batch` build identical bodies from identical requests.

`n` choices become n requests with the same prompt (the prefix cache evaluates it
once and shares its KV); choice i of a seeded request draws from a seed derived
from (seed, i), so the same body gives the same choices whatever else is running.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import orjson

from llamba_cli.engine import Request, RequestOutput, SamplingParams, normalize, schema_to_gbnf
from llamba_cli.errors import ConfigError, RowError, TemplateError
from llamba_cli.job.prompts import PromptBuilder
from llamba_cli.openai.errors import ApiError, InvalidRequest, RequestFailed
from llamba_cli.openai.logprobs import CompletionLogprobs, chat_logprobs
from llamba_cli.openai.schemas import (
    ChatBody,
    ChatMessage,
    ClassifyBody,
    CompletionBody,
    SamplingBody,
)
from llamba_cli.openai.served import ServedModel

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions
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


def _usage(requests: Sequence[Request], prompts: int) -> dict[str, Any]:
    """Token counts; a prompt shared by n choices counts once."""
    per_prompt = len(requests) // max(prompts, 1)
    firsts = requests[::per_prompt] if per_prompt else []
    prompt = sum(r.prompt_tokens for r in firsts)
    completion = sum(r.completion_tokens for r in requests)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(r.cached_tokens for r in firsts)},
    }


class Call:
    """Base of the three calls. `requests` are submitted as they are; `kind` names the
    endpoint ("completion", "chat", "classify")."""

    kind = ""
    object_name = ""
    id_prefix = ""
    prompt_param = "prompt"

    def __init__(self, served: ServedModel, *, call_id: str, created: int) -> None:
        self.served = served
        self.id = f"{self.id_prefix}-{call_id}"
        self.created = created
        self.requests: list[Request] = []
        self.stream = False
        self.include_usage = False
        self.prompts = 1

    def _request(self, index: int, prompt: str, params: SamplingParams | None, **kw: Any) -> None:
        req = Request(id=f"{self.id}/{index}", prompt=prompt, sample=index, **kw)
        if params is not None:
            req.params = params
        self.requests.append(req)

    def failure(self) -> ApiError | None:
        """The error this call answers with, if a request failed: one that could not
        start (bad prompt, too long, a grammar llama.cpp rejects) is the client's (400);
        one that failed while running, or was aborted, is the server's."""
        for req in self.requests:
            if req.finish_reason == "error":
                message = req.error or "the request failed"
                if req.completion_tokens == 0:
                    return InvalidRequest(message, param=self.prompt_param)
                return RequestFailed(message)
            if req.finish_reason == "abort":
                return RequestFailed(
                    f"the request was aborted ({req.error or 'shutdown'})", status=503
                )
        return None

    def check(self) -> None:
        error = self.failure()
        if error is not None:
            raise error

    def _envelope(self, **fields: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self.object_name,
            "created": self.created,
            "model": self.served.name,
            **fields,
        }

    def response(self) -> dict[str, Any]:
        """The response body once every request has finished; raises ApiError."""
        raise NotImplementedError

    # -- streaming ----------------------------------------------------------------------

    def stream_start(self) -> list[dict[str, Any]]:
        return []

    def stream_chunks(self, out: RequestOutput) -> list[dict[str, Any]]:
        raise NotImplementedError

    def stream_end(self) -> list[dict[str, Any]]:
        """The usage chunk (`choices: []`) when `stream_options.include_usage` asked for it."""
        if not self.include_usage:
            return []
        return [self._chunk([], usage=_usage(self.requests, self.prompts))]

    def _chunk(self, choices: list[dict[str, Any]], usage: Any = None) -> dict[str, Any]:
        chunk = self._envelope(choices=choices)
        chunk["object"] = self.chunk_object
        if self.include_usage:
            chunk["usage"] = usage
        return chunk

    chunk_object = ""


class CompletionCall(Call):
    kind = "completion"
    object_name = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl"

    def __init__(
        self, served: ServedModel, body: CompletionBody, *, call_id: str, created: int
    ) -> None:
        super().__init__(served, call_id=call_id, created=created)
        self.body = body
        self.stream = bool(body.stream)
        self.include_usage = body.include_usage
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if any(not p for p in prompts):
            raise InvalidRequest("prompt: a prompt must not be empty", param="prompt")
        self.prompts = len(prompts)
        self.prompt_texts = prompts
        grammar = grammar_for(body)
        max_tokens = body.max_tokens or COMPLETION_DEFAULT_MAX_TOKENS
        for p, prompt in enumerate(prompts):
            for j in range(body.n):
                params = sampling_params(
                    body,
                    served,
                    max_tokens=max_tokens,
                    seed=choice_seed(body.seed, j),
                    logprobs=body.logprobs,
                )
                self._request(p * body.n + j, prompt, params, grammar_text=grammar)
        self._logprobs = [self._new_logprobs(i) for i in range(len(self.requests))]
        self._echoed = [False] * len(self.requests)

    def _echo(self, index: int) -> str:
        return self.prompt_texts[index // self.body.n] if self.body.echo else ""

    def _new_logprobs(self, index: int) -> CompletionLogprobs:
        return CompletionLogprobs(offset=len(self._echo(index)))

    def response(self) -> dict[str, Any]:
        self.check()
        choices = []
        for i, req in enumerate(self.requests):
            logprobs = None
            if self.body.logprobs is not None:
                logprobs = self._new_logprobs(i).add(req.logprobs or [])
            choices.append(
                {
                    "index": i,
                    "text": self._echo(i) + req.text,
                    "logprobs": logprobs,
                    "finish_reason": req.finish_reason,
                }
            )
        return self._envelope(choices=choices, usage=_usage(self.requests, self.prompts))

    def stream_chunks(self, out: RequestOutput) -> list[dict[str, Any]]:
        req = out.request
        i = req.sample
        if out.finished:
            self._raise_if_failed(req)
        text = out.text
        if not self._echoed[i]:
            text = self._echo(i) + text
            self._echoed[i] = True
        logprobs = None
        if self.body.logprobs is not None and out.logprobs:
            logprobs = self._logprobs[i].add(out.logprobs)
        if not text and logprobs is None and not out.finished:
            return []
        choice = {
            "index": i,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": req.finish_reason if out.finished else None,
        }
        return [self._chunk([choice])]

    def _raise_if_failed(self, req: Request) -> None:
        if req.finish_reason in ("error", "abort"):
            self.check()


class ChatCall(Call):
    kind = "chat"
    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl"
    prompt_param = "messages"

    def __init__(
        self,
        served: ServedModel,
        builder: PromptBuilder,
        body: ChatBody,
        *,
        call_id: str,
        created: int,
    ) -> None:
        super().__init__(served, call_id=call_id, created=created)
        self.body = body
        self.stream = bool(body.stream)
        self.include_usage = body.include_usage
        prompt = render_messages(builder, body.messages)
        grammar = grammar_for(body)
        max_tokens = body.max_completion_tokens or body.max_tokens or served.n_ctx_seq
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        for j in range(body.n):
            params = sampling_params(
                body,
                served,
                max_tokens=max_tokens,
                seed=choice_seed(body.seed, j),
                logprobs=logprobs,
                extra_stop=served.prompt_format.stop,
            )
            self._request(j, prompt, params, grammar_text=grammar)

    def response(self) -> dict[str, Any]:
        self.check()
        choices = []
        for i, req in enumerate(self.requests):
            logprobs = None
            if self.body.logprobs:
                logprobs = {"content": chat_logprobs(req.logprobs or []), "refusal": None}
            choices.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": req.text, "refusal": None},
                    "logprobs": logprobs,
                    "finish_reason": req.finish_reason,
                }
            )
        return self._envelope(choices=choices, usage=_usage(self.requests, 1))

    def stream_start(self) -> list[dict[str, Any]]:
        return [
            self._chunk(
                [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            )
            for i in range(len(self.requests))
        ]

    def stream_chunks(self, out: RequestOutput) -> list[dict[str, Any]]:
        req = out.request
        if out.finished and req.finish_reason in ("error", "abort"):
            self.check()
        logprobs = None
        if self.body.logprobs and out.logprobs:
            logprobs = {"content": chat_logprobs(out.logprobs), "refusal": None}
        if not out.text and logprobs is None and not out.finished:
            return []
        delta = {"content": out.text} if out.text or logprobs is not None else {}
        choice = {
            "index": req.sample,
            "delta": delta,
            "logprobs": logprobs,
            "finish_reason": req.finish_reason if out.finished else None,
        }
        return [self._chunk([choice])]


class ClassifyCall(Call):
    """llamba's own endpoint: P(label | prompt) for every label, exactly as
    `llamba classify` computes it (each label tokenized together with the prompt)."""

    kind = "classify"
    object_name = "classification"
    id_prefix = "clf"

    def __init__(
        self,
        served: ServedModel,
        builder: PromptBuilder,
        body: ClassifyBody,
        *,
        call_id: str,
        created: int,
    ) -> None:
        super().__init__(served, call_id=call_id, created=created)
        self.body = body
        if body.messages is not None:
            self.prompt_param = "messages"
            prompt = render_messages(builder, body.messages)
        else:
            assert body.prompt is not None
            prompt = body.prompt
        self._request(
            0,
            prompt,
            None,
            labels=tuple(body.labels),
            label_delimiter=body.label_delimiter,
        )

    def response(self) -> dict[str, Any]:
        self.check()
        req = self.requests[0]
        if req.label_logprobs is None:
            raise RequestFailed("classification finished without label scores")
        probs = normalize(req.label_logprobs)
        best = max(range(len(probs)), key=probs.__getitem__)
        prompt = req.prompt_tokens
        return self._envelope(
            label=self.body.labels[best],
            confidence=probs[best],
            labels=[
                {"label": label, "probability": p, "logprob": lp}
                for label, p, lp in zip(self.body.labels, probs, req.label_logprobs, strict=True)
            ],
            usage={
                "prompt_tokens": prompt,
                "completion_tokens": 0,
                "total_tokens": prompt,
                "prompt_tokens_details": {"cached_tokens": req.cached_tokens},
            },
        )

    def stream_chunks(self, out: RequestOutput) -> list[dict[str, Any]]:
        return []


def render_messages(builder: PromptBuilder, messages: Sequence[ChatMessage]) -> str:
    """The prompt text of a conversation, through the served prompt format."""
    try:
        return builder.build({"messages": [m.as_dict() for m in messages]})
    except RowError as e:
        raise InvalidRequest(f"messages: {e}", param="messages") from None
    except TemplateError as e:
        raise RequestFailed(str(e)) from None
