"""The OpenAI protocol layer without a model or HTTP: bodies -> engine requests,
finished requests (made by hand) -> response bodies and stream chunks, checked
against the `openai` package's own response types."""

from __future__ import annotations

import math
from typing import Any

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from llamba_cli.engine import Request, RequestOutput, TokenLogprob
from llamba_cli.job.formats import load_format
from llamba_cli.openai import (
    CHAT_COMPLETIONS,
    CLASSIFY,
    COMPLETIONS,
    InvalidRequest,
    OpenAIApi,
    RequestFailed,
    ServedModel,
)
from llamba_cli.openai.sampling import choice_seed


def served(fmt: str = "plain") -> ServedModel:
    return ServedModel(
        name="test-model",
        prompt_format=load_format(fmt),
        n_vocab=1000,
        n_ctx_seq=512,
        bos_token="<bos>",
        eos_token="<eos>",
        created=1,
    )


@pytest.fixture
def api() -> OpenAIApi:
    return OpenAIApi(served())


def finish(
    req: Request,
    text: str,
    reason: str = "stop",
    *,
    prompt_tokens: int = 5,
    completion_tokens: int = 3,
    cached: int = 0,
    logprobs: list[TokenLogprob] | None = None,
    error: str | None = None,
) -> Request:
    """Make `req` look like the engine finished it."""
    req.num_prompt = prompt_tokens
    req.completion_tokens = completion_tokens
    req.cached_tokens = cached
    req.logprobs = logprobs
    req.finish(reason, error)
    req.text = text
    return req


def lp(text: bytes, logprob: float, *top: tuple[bytes, float]) -> TokenLogprob:
    return TokenLogprob(
        token=0, text=text, logprob=logprob, top=[(i, t, v) for i, (t, v) in enumerate(top)]
    )


# -- request mapping ------------------------------------------------------------------


def test_completion_defaults_follow_openai(api: OpenAIApi) -> None:
    call = api.call(COMPLETIONS, {"model": "anything", "prompt": "Once upon"})
    [req] = call.requests
    p = req.params
    assert req.prompt == "Once upon"
    assert (p.temperature, p.top_p, p.top_k, p.min_p) == (1.0, 1.0, 0, 0.0)
    assert p.max_tokens == 16
    assert p.stop == () and p.seed is None and p.logprobs is None
    assert req.grammar_text is None and req.labels is None


def test_completion_fields_map_onto_sampling(api: OpenAIApi) -> None:
    call = api.call(
        COMPLETIONS,
        {
            "prompt": ["a", "b"],
            "n": 3,
            "temperature": 0,
            "top_p": 0.5,
            "top_k": 7,
            "min_p": 0.1,
            "repetition_penalty": 1.2,
            "presence_penalty": 0.5,
            "frequency_penalty": -0.5,
            "max_tokens": 9,
            "stop": "\n",
            "seed": 42,
            "logit_bias": {"17": -100, "3": 2.5},
            "logprobs": 2,
            "ignore_eos": True,
            "some_unknown_field": {"is": "ignored"},
        },
    )
    assert [r.prompt for r in call.requests] == ["a", "a", "a", "b", "b", "b"]
    assert [r.sample for r in call.requests] == list(range(6))
    p = call.requests[0].params
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.repeat_penalty) == (0, 0.5, 7, 0.1, 1.2)
    assert (p.presence_penalty, p.frequency_penalty, p.max_tokens) == (0.5, -0.5, 9)
    assert p.stop == ("\n",) and p.logprobs == 2 and p.ignore_eos
    assert p.logit_bias == ((17, -100.0), (3, 2.5))
    # choice j of every prompt draws from the same seed; the first from the seed itself
    seeds = [r.params.seed for r in call.requests]
    assert seeds[:3] == seeds[3:] == [42, choice_seed(42, 1), choice_seed(42, 2)]
    assert len(set(seeds[:3])) == 3


def test_chat_renders_messages_through_the_format() -> None:
    api = OpenAIApi(served("gemma"))
    call = api.call(
        CHAT_COMPLETIONS,
        {
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}],
                },
            ],
            "n": 2,
            "stop": ["END"],
            "max_completion_tokens": 20,
            "max_tokens": 99,
        },
    )
    a, b = call.requests
    assert a.prompt == b.prompt
    assert a.prompt == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi\nthere<end_of_turn>\n<start_of_turn>model\n"
    )
    assert a.params.stop == ("END", "<end_of_turn>")  # the format's own stop strings follow
    assert a.params.max_tokens == 20  # max_completion_tokens wins over max_tokens


def test_chat_without_max_tokens_runs_to_the_context(api: OpenAIApi) -> None:
    call = api.call(CHAT_COMPLETIONS, {"messages": [{"role": "user", "content": "x"}]})
    assert call.requests[0].params.max_tokens == 512
    assert call.requests[0].prompt == "x"  # plain format: the content as it is


def test_response_format_becomes_a_grammar(api: OpenAIApi) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    body = {"messages": [{"role": "user", "content": "x"}]}
    call = api.call(
        CHAT_COMPLETIONS,
        {
            **body,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "p", "schema": schema},
            },
        },
    )
    grammar = call.requests[0].grammar_text
    assert grammar is not None and "root ::=" in grammar and '"\\"name\\""' in grammar
    obj = api.call(CHAT_COMPLETIONS, {**body, "response_format": {"type": "json_object"}})
    assert obj.requests[0].grammar_text is not None and "object" in obj.requests[0].grammar_text
    text = api.call(CHAT_COMPLETIONS, {**body, "response_format": {"type": "text"}})
    assert text.requests[0].grammar_text is None
    raw = api.call(CHAT_COMPLETIONS, {**body, "grammar": 'root ::= "yes" | "no"'})
    assert raw.requests[0].grammar_text == 'root ::= "yes" | "no"'


def test_classify_maps_labels(api: OpenAIApi) -> None:
    call = api.call(CLASSIFY, {"prompt": "Sentiment:", "labels": ["good", "bad"]})
    [req] = call.requests
    assert req.prompt == "Sentiment:" and req.labels == ("good", "bad")
    assert req.label_delimiter == " "
    chat = api.call(
        CLASSIFY,
        {
            "messages": [{"role": "user", "content": "Is it?"}],
            "labels": ["yes", "no"],
            "label_delimiter": "",
        },
    )
    assert chat.requests[0].prompt == "Is it?" and chat.requests[0].label_delimiter == ""


# -- invalid bodies ---------------------------------------------------------------------

CHAT = {"messages": [{"role": "user", "content": "x"}]}
INVALID: list[tuple[str, Any, str | None]] = [
    (COMPLETIONS, {"prompt": "x", "temperature": "0.5"}, "temperature"),
    (COMPLETIONS, {"prompt": "x", "temperature": 3}, "temperature"),
    (COMPLETIONS, {"prompt": "x", "n": 0}, "n"),
    (COMPLETIONS, {"prompt": "x", "n": True}, "n"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    (COMPLETIONS, {"prompt": "x", "stop": 5}, "stop"),
    (COMPLETIONS, {"prompt": "x", "stop": [""]}, "stop"),
    (COMPLETIONS, {"prompt": "x", "logprobs": 21}, "logprobs"),
    (COMPLETIONS, {"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
    (COMPLETIONS, {"prompt": "x", "logit_bias": {"1000": 1}}, "logit_bias"),
    (COMPLETIONS, {"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
    (COMPLETIONS, {"prompt": [1, 2, 3]}, "prompt"),
    (COMPLETIONS, {"prompt": ""}, "prompt"),
    (COMPLETIONS, {}, "prompt"),
    (COMPLETIONS, {"prompt": "x", "suffix": "y"}, "suffix"),
    (COMPLETIONS, {"prompt": "x", "best_of": 3}, "best_of"),
    (
        COMPLETIONS,
        {"prompt": "x", "stream_options": {"include_usage": "yes"}},
        "stream_options.include_usage",
    ),
    (CHAT_COMPLETIONS, {"messages": []}, "messages"),
    (CHAT_COMPLETIONS, {"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    (CHAT_COMPLETIONS, {"messages": [{"role": "user"}]}, "messages[0].content"),
    (
        CHAT_COMPLETIONS,
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        "messages[0].content",
    ),
    (CHAT_COMPLETIONS, {**CHAT, "top_logprobs": 2}, "top_logprobs"),
    (CHAT_COMPLETIONS, {**CHAT, "tools": [{"type": "function"}]}, "tools"),
    (CHAT_COMPLETIONS, {**CHAT, "response_format": {"type": "xml"}}, "response_format.type"),
    (CHAT_COMPLETIONS, {**CHAT, "response_format": {"type": "json_schema"}}, "response_format"),
    (
        CHAT_COMPLETIONS,
        {
            **CHAT,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"schema": {"type": "string", "format": "email"}},
            },
        },
        "response_format.json_schema.schema",
    ),
    (
        CHAT_COMPLETIONS,
        {**CHAT, "response_format": {"type": "json_object"}, "grammar": "root ::= x"},
        "grammar",
    ),
    (CLASSIFY, {"prompt": "x", "labels": ["only"]}, "labels"),
    (CLASSIFY, {"prompt": "x", "labels": ["a", "a"]}, "labels"),
    (CLASSIFY, {"prompt": "x", "labels": ["a", " "]}, "labels"),
    (CLASSIFY, {"labels": ["a", "b"]}, "prompt"),
    (CLASSIFY, {"prompt": "x", **CHAT, "labels": ["a", "b"]}, "prompt"),
    ("/v1/embeddings", {"input": "x"}, "url"),
    (COMPLETIONS, ["not", "an", "object"], None),
]


@pytest.mark.parametrize(("route", "body", "param"), INVALID)
def test_invalid_bodies_name_the_field(
    api: OpenAIApi, route: str, body: Any, param: str | None
) -> None:
    with pytest.raises(InvalidRequest) as exc:
        api.call(route, body)
    err = exc.value
    assert err.status == 400 and err.param == param
    shape = err.body()["error"]
    assert set(shape) == {"message", "type", "param", "code"}
    assert shape["type"] == "invalid_request_error" and "\n" not in shape["message"]


# -- response bodies ------------------------------------------------------------------


def test_completion_response_validates_as_openai_completion(api: OpenAIApi) -> None:
    call = api.call(COMPLETIONS, {"prompt": "Say", "n": 2, "echo": True}, call_id="abc", created=7)
    a, b = call.requests
    finish(a, " hi", prompt_tokens=4, completion_tokens=2, cached=0)
    finish(b, " ho there", "length", prompt_tokens=4, completion_tokens=3, cached=3)
    body = call.response()
    parsed = Completion.model_validate(body)
    assert parsed.id == "cmpl-abc" and parsed.created == 7 and parsed.model == "test-model"
    assert [c.text for c in parsed.choices] == ["Say hi", "Say ho there"]
    assert [c.finish_reason for c in parsed.choices] == ["stop", "length"]
    assert parsed.usage is not None
    # the prompt is shared by both choices: counted once
    assert (parsed.usage.prompt_tokens, parsed.usage.completion_tokens) == (4, 5)
    assert parsed.usage.total_tokens == 9


def test_chat_response_validates_as_openai_chat_completion(api: OpenAIApi) -> None:
    call = api.call(CHAT_COMPLETIONS, {**CHAT, "logprobs": True, "top_logprobs": 2})
    [req] = call.requests
    assert req.params.logprobs == 2
    finish(
        req,
        "Hé",
        logprobs=[
            lp(b"H", -0.1, (b"H", -0.1), (b"A", -2.5)),
            lp(b"\xc3", -0.2, (b"\xc3", -0.2), (b"x", -3.0)),
            lp(b"\xa9", -math.inf),
        ],
    )
    parsed = ChatCompletion.model_validate(call.response())
    choice = parsed.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == "Hé"
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert [t.token for t in content] == ["H", "\\xc3", "\\xa9"]
    assert [t.bytes for t in content] == [[72], [0xC3], [0xA9]]
    assert content[2].logprob == -9999.0  # JSON has no -Infinity
    assert [t.token for t in content[0].top_logprobs] == ["H", "A"]


def test_completion_logprobs_shape_and_offsets(api: OpenAIApi) -> None:
    call = api.call(COMPLETIONS, {"prompt": "ab", "logprobs": 1, "echo": True})
    finish(
        call.requests[0],
        "é!",
        logprobs=[
            lp(b"\xc3", -0.5, (b"\xc3", -0.5)),
            lp(b"\xa9", -0.1, (b"\xa9", -0.1)),
            lp(b"!", -1.0, (b"?", -0.9)),
        ],
    )
    parsed = Completion.model_validate(call.response())
    logprobs = parsed.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.tokens == ["\\xc3", "\\xa9", "!"]
    assert logprobs.token_logprobs == [-0.5, -0.1, -1.0]
    assert logprobs.top_logprobs == [{"\\xc3": -0.5}, {"\\xa9": -0.1}, {"?": -0.9}]
    # offsets count characters of the choice's text, after the echoed prompt
    assert logprobs.text_offset == [2, 2, 3]


def test_classify_response(api: OpenAIApi) -> None:
    call = api.call(CLASSIFY, {"prompt": "Mood:", "labels": ["happy", "sad", "meh"]})
    req = finish(call.requests[0], "", prompt_tokens=3, completion_tokens=0)
    req.label_logprobs = [math.log(0.2), math.log(0.6), math.log(0.1)]
    body = call.response()
    assert body["object"] == "classification" and body["label"] == "sad"
    probs = {item["label"]: item["probability"] for item in body["labels"]}
    assert probs == pytest.approx({"happy": 2 / 9, "sad": 6 / 9, "meh": 1 / 9})
    assert body["confidence"] == pytest.approx(6 / 9)
    assert body["labels"][1]["logprob"] == pytest.approx(math.log(0.6))
    assert body["usage"]["prompt_tokens"] == 3 and body["usage"]["completion_tokens"] == 0


def test_failures_map_to_statuses(api: OpenAIApi) -> None:
    call = api.call(CHAT_COMPLETIONS, CHAT)
    finish(call.requests[0], "", "error", completion_tokens=0, error="prompt has 900 tokens")
    with pytest.raises(InvalidRequest) as bad:
        call.response()
    assert bad.value.param == "messages" and "900 tokens" in bad.value.message

    call = api.call(COMPLETIONS, {"prompt": "x"})
    finish(call.requests[0], "ab", "error", completion_tokens=2, error="llama.cpp failed")
    with pytest.raises(RequestFailed) as failed:
        call.response()
    assert failed.value.status == 500

    call = api.call(COMPLETIONS, {"prompt": "x"})
    finish(call.requests[0], "", "abort", completion_tokens=0, error="shutdown")
    with pytest.raises(RequestFailed) as aborted:
        call.response()
    assert aborted.value.status == 503


def test_constrained_request_cut_by_length_still_answers(api: OpenAIApi) -> None:
    call = api.call(CHAT_COMPLETIONS, {**CHAT, "response_format": {"type": "json_object"}})
    finish(call.requests[0], '{"a": ', "length", error="output did not complete the grammar")
    body = ChatCompletion.model_validate(call.response())
    assert body.choices[0].finish_reason == "length"
    assert body.choices[0].message.content == '{"a": '


# -- streaming ------------------------------------------------------------------------


def outputs(req: Request, deltas: list[str], reason: str = "stop") -> list[RequestOutput]:
    """The outputs the engine would hand out for `req` producing `deltas`."""
    outs = []
    for i, delta in enumerate(deltas):
        last = i == len(deltas) - 1
        if last:
            finish(req, "".join(deltas), reason, completion_tokens=len(deltas))
        outs.append(
            RequestOutput(request=req, token_ids=[i], text=delta, logprobs=None, finished=last)
        )
    return outs


def test_chat_stream_chunks(api: OpenAIApi) -> None:
    call = api.call(
        CHAT_COMPLETIONS,
        {**CHAT, "n": 2, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert call.stream and call.include_usage
    a, b = call.requests
    chunks = list(call.stream_start())
    for out in [*outputs(a, ["Hel", "", "lo"]), *outputs(b, ["Yo"], "length")]:
        chunks += call.stream_chunks(out)
    chunks += call.stream_end()
    parsed = [ChatCompletionChunk.model_validate(c) for c in chunks]
    assert all(p.id == parsed[0].id and p.object == "chat.completion.chunk" for p in parsed)
    assert [p.choices[0].delta.role for p in parsed[:2]] == ["assistant", "assistant"]
    texts: dict[int, str] = {0: "", 1: ""}
    reasons = {}
    for p in parsed[:-1]:
        [choice] = p.choices
        texts[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            reasons[choice.index] = choice.finish_reason
        assert p.usage is None
    assert texts == {0: "Hello", 1: "Yo"} and reasons == {0: "stop", 1: "length"}
    usage_chunk = parsed[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == 4


def test_completion_stream_chunks_with_echo_and_logprobs(api: OpenAIApi) -> None:
    call = api.call(COMPLETIONS, {"prompt": "Q:", "stream": True, "echo": True, "logprobs": 0})
    [req] = call.requests
    first = RequestOutput(
        request=req, token_ids=[1], text="", logprobs=[lp(b"\xc3", -0.3)], finished=False
    )
    second = RequestOutput(
        request=req, token_ids=[2], text="é", logprobs=[lp(b"\xa9", -0.2)], finished=False
    )
    finish(req, "é", completion_tokens=2)
    last = RequestOutput(request=req, token_ids=[], text="", logprobs=None, finished=True)
    chunks = [c for out in (first, second, last) for c in call.stream_chunks(out)]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "stop"]
    # The client reads chunks as `Completion`s, whose type allows no null finish_reason.
    for c in chunks:
        c["choices"][0]["finish_reason"] = c["choices"][0]["finish_reason"] or "length"
    parsed = [Completion.model_validate(c) for c in chunks]
    assert "".join(p.choices[0].text for p in parsed) == "Q:é"
    offsets = [
        o for p in parsed if p.choices[0].logprobs for o in p.choices[0].logprobs.text_offset or []
    ]
    assert offsets == [2, 2]
    assert call.stream_end() == []  # no usage chunk unless asked


def test_stream_failure_raises_for_an_error_event(api: OpenAIApi) -> None:
    call = api.call(CHAT_COMPLETIONS, {**CHAT, "stream": True})
    [req] = call.requests
    finish(req, "", "error", completion_tokens=0, error="prompt has 900 tokens")
    out = RequestOutput(request=req, token_ids=[], text="", logprobs=None, finished=True)
    with pytest.raises(InvalidRequest):
        call.stream_chunks(out)
