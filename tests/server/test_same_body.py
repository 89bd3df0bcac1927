"""One protocol layer for HTTP and for batch runs: the same bodies sent to a fresh
1-slot `llamba serve`, and mapped by `OpenAIApi` onto an engine in this process with
the same settings (no HTTP), give the same response bodies apart from ids and times."""

from __future__ import annotations

from typing import Any

from llamba_cli.engine import Model
from llamba_cli.openai import CHAT_COMPLETIONS, CLASSIFY, COMPLETIONS, OpenAIApi, served_model
from tests.server.serving import start_server

BODIES: list[tuple[str, dict[str, Any]]] = [
    (
        CHAT_COMPLETIONS,
        {
            "model": "m",
            "messages": [{"role": "user", "content": "Name three fruits."}],
            "max_tokens": 10,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 2,
        },
    ),
    (
        COMPLETIONS,
        {
            "model": "m",
            "prompt": "Once upon a time",
            "max_tokens": 10,
            "temperature": 0.9,
            "seed": 4,
        },
    ),
    (
        CLASSIFY,
        {"model": "m", "prompt": "Is the sky blue? Answer:", "labels": ["yes", "no", "maybe"]},
    ),
]


def without_ids(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in ("id", "created")}


def test_server_and_engine_give_the_same_bodies(make_engine: Any, model: Model) -> None:
    server = start_server("--slots", "1", "--ctx", "512")
    try:
        over_http = []
        for route, body in BODIES:
            status, answer = server.post(route, body)
            assert status == 200, answer
            over_http.append(answer)
    finally:
        server.stop()

    engine = make_engine(slots=1, n_ctx_seq=512)
    api = OpenAIApi(served_model(model, n_ctx_seq=512))
    direct = []
    for route, body in BODIES:  # one at a time, in the same order as over HTTP
        call = api.call(route, body)
        for _ in engine.run(call.requests):
            pass
        direct.append(call.response())

    for got, want in zip(over_http, direct, strict=True):
        assert got["model"] == want["model"] == "gemma-3-270m-q4_k_m"
        assert without_ids(got) == without_ids(want)
