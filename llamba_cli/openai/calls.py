"""One API call: a validated body, the engine `Request`s it becomes, and its response.

    call = api.call("/v1/chat/completions", body)      # InvalidRequest if the body is bad
    for req in engine.run(call.requests): ...          # or EngineLoop.submit each one
    body = call.response()                             # ApiError if a request failed

Streaming takes the same call: `stream_start()`, then `stream_chunks(output)` for each
`RequestOutput` as the engine produces it, then `stream_end()`; the chunks are the
`data:` payloads of OpenAI's server-sent events.  Nothing here does I/O, so the
server and `llamba batch` build identical bodies from identical requests.

`n` choices become n requests with the same prompt (the prefix cache evaluates it
once and shares its KV), each with the engine parameters `openai.sampling` derives
from the body.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llamba_cli.engine import Request, RequestOutput, SamplingParams, normalize
from llamba_cli.errors import RowError, TemplateError
from llamba_cli.job.prompts import PromptBuilder
from llamba_cli.openai.errors import ApiError, InvalidRequest, RequestFailed
from llamba_cli.openai.logprobs import CompletionLogprobs, chat_logprobs
from llamba_cli.openai.sampling import choice_seed, grammar_for, sampling_params
from llamba_cli.openai.schemas import ChatBody, ChatMessage, ClassifyBody, CompletionBody
from llamba_cli.openai.served import ServedModel

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions


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
