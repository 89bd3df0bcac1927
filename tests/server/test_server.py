"""`llamba serve` over real HTTP on 127.0.0.1, with the embedded model, driven by the
real `openai` client (and raw HTTP where the client hides what is checked)."""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

import openai
import pytest

from llamba_cli.engine import normalize
from tests.server.serving import API_KEY, Server

SHORT = "The capital of France is"  # well under 16 tokens: never a shared prefix
LONG = (
    "You are a helpful assistant who answers questions about geography in one short "
    "sentence, without any extra commentary. Question: what is the largest ocean?"
)


def wait_for(predicate: Any, timeout: float = 30.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def sse_events(resp: Any) -> list[Any]:
    """Parsed `data:` payloads of a streamed http.client response, up to [DONE]."""
    events = []
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            events.append("[DONE]")
            break
        events.append(json.loads(data))
    return events


# -- basics ----------------------------------------------------------------------------


def test_health_page_models_and_auth(server: Server) -> None:
    assert server.request("GET", "/health", auth=False)[0] == 200
    status, headers, page = server.request("GET", "/", auth=False)
    assert status == 200 and b"<title>llamba</title>" in page
    assert "text/html" in headers["content-type"]

    models = server.client().models.list()
    assert [m.id for m in models.data] == ["gemma-3-270m-q4_k_m"]

    for path in ("/v1/models", "/metrics"):
        status, _, raw = server.request("GET", path, auth=False)
        assert status == 401
        assert json.loads(raw)["error"]["code"] == "invalid_api_key"
    wrong = server.client(api_key="wrong-key")
    with pytest.raises(openai.AuthenticationError) as exc:
        wrong.completions.create(model="m", prompt="x", max_tokens=1)
    assert exc.value.status_code == 401
    body = exc.value.body
    assert isinstance(body, dict) and set(body) == {"message", "type", "param", "code"}


def test_invalid_bodies_are_400_in_openai_shape(server: Server) -> None:
    client = server.client()
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "x"}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"not": {}}},
            },
        )
    assert exc.value.status_code == 400
    assert isinstance(exc.value.body, dict)
    assert exc.value.body["param"] == "response_format.json_schema.schema"
    assert "not" in exc.value.body["message"]
    status, err = server.post("/v1/chat/completions", {"messages": [], "model": "m"})
    assert status == 400 and err["error"]["param"] == "messages"
    status, _, raw = server.request("POST", "/v1/completions", None)
    assert status == 400 and "JSON" in json.loads(raw)["error"]["message"]
    # a prompt longer than a sequence holds: the client's fault, found by the engine
    status, err = server.post("/v1/completions", {"prompt": "word " * 600, "max_tokens": 2})
    assert status == 400 and "512" in err["error"]["message"]
    status, err = server.post(
        "/v1/completions", {"prompt": "word " * 600, "max_tokens": 2, "stream": True}
    )
    assert status == 400  # decided before the stream starts


# -- completions and chat --------------------------------------------------------------


def test_completion_streaming_equals_whole(server: Server) -> None:
    client = server.client()
    whole = client.completions.create(model="m", prompt=SHORT, max_tokens=12, temperature=0)
    [choice] = whole.choices
    assert choice.text and choice.finish_reason in ("stop", "length")
    assert whole.usage is not None and whole.usage.completion_tokens <= 12
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    chunks = list(
        client.completions.create(
            model="m",
            prompt=SHORT,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == choice.text  # the same computation, token for token
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason


def test_chat_streaming_equals_whole(server: Server) -> None:
    client = server.client()
    messages = [{"role": "user", "content": "Name a colour."}]
    whole = client.chat.completions.create(
        model="m",
        messages=messages,
        max_tokens=10,
        temperature=0,  # type: ignore[arg-type]
    )
    [choice] = whole.choices
    assert choice.message.role == "assistant" and choice.message.content

    stream = client.chat.completions.create(
        model="m",
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,  # type: ignore[arg-type]
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_n_samples_share_the_prompt(server: Server) -> None:
    client = server.client()
    before = server.metrics()
    resp = client.completions.create(
        model="m", prompt=LONG, n=3, max_tokens=8, temperature=1.0, seed=5
    )
    after = server.metrics()
    assert sorted(c.index for c in resp.choices) == [0, 1, 2]
    assert resp.usage is not None
    prompt_tokens = resp.usage.prompt_tokens
    assert prompt_tokens > 16  # counted once, not three times
    reused = (
        after["llamba_prompt_tokens_reused_total"] - before["llamba_prompt_tokens_reused_total"]
    )
    evaluated = (
        after["llamba_prompt_tokens_evaluated_total"]
        - before["llamba_prompt_tokens_evaluated_total"]
    )
    assert reused >= 2 * (prompt_tokens - 1)  # the other two choices reuse its KV
    assert evaluated < 2 * prompt_tokens


def test_same_seed_same_text(server: Server) -> None:
    client = server.client()

    def sample(seed: int) -> str:
        r = client.completions.create(
            model="m",
            prompt=SHORT,
            max_tokens=8,
            temperature=1.0,
            seed=seed,
            extra_body={"top_k": 0},
        )
        return r.choices[0].text

    assert sample(11) == sample(11)
    assert len({sample(s) for s in (1, 2, 3, 4)}) > 1


def test_stop_strings(server: Server) -> None:
    client = server.client()
    free = client.completions.create(model="m", prompt=SHORT, max_tokens=16, temperature=0)
    text = free.choices[0].text
    assert len(text) >= 6
    stop = text[3:6]
    cut = client.completions.create(
        model="m", prompt=SHORT, max_tokens=16, temperature=0, stop=[stop, "never-seen"]
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model="m", prompt=SHORT, max_tokens=16, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_logprobs(server: Server) -> None:
    client = server.client()
    comp = client.completions.create(
        model="m", prompt=SHORT, max_tokens=6, temperature=0, logprobs=3
    )
    lp = comp.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    assert comp.usage is not None and len(lp.tokens) == comp.usage.completion_tokens
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) <= 3 and value <= 0
        best = max(top, key=lambda t: top[t])
        assert best == token and top[token] == value  # greedy picks the top token
    assert lp.text_offset is not None and lp.text_offset[0] == 0
    assert lp.text_offset == sorted(lp.text_offset)

    chat = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "Say yes."}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs
    assert content is not None and content.content
    raw = b"".join(bytes(t.bytes or []) for t in content.content)
    assert raw.decode("utf-8", "replace") == chat.choices[0].message.content
    for t in content.content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob


def test_json_schema(server: Server) -> None:
    schema = {
        "type": "object",
        "properties": {
            "sentiment": {"type": "string", "enum": ["positive", "negative"]},
            "stars": {"type": "integer", "minimum": 1, "maximum": 5},
        },
        "required": ["sentiment", "stars"],
        "additionalProperties": False,
    }
    client = server.client()
    resp = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "Review: I loved it. Give JSON."}],
        max_tokens=60,
        temperature=0.7,
        seed=3,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "review", "schema": schema},
        },
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "stop"
    value = json.loads(choice.message.content or "")
    assert set(value) == {"sentiment", "stars"}
    assert value["sentiment"] in ("positive", "negative") and 1 <= value["stars"] <= 5

    obj = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "Any JSON object."}],
        max_tokens=40,
        temperature=0,
        response_format={"type": "json_object"},
    )
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content or ""), dict)
    else:  # cut by max_tokens: still the start of an object
        assert (obj.choices[0].message.content or "").lstrip().startswith("{")


def test_classify(server: Server, make_engine: Any) -> None:
    prompt = "Review: Terrible, it broke on the first day.\nSentiment:"
    labels = ["positive", "negative"]
    status, body = server.post("/v1/classify", {"model": "m", "prompt": prompt, "labels": labels})
    assert status == 200, body
    assert body["object"] == "classification"
    probs = [item["probability"] for item in body["labels"]]
    logprobs = [item["logprob"] for item in body["labels"]]
    assert [item["label"] for item in body["labels"]] == labels
    assert sum(probs) == pytest.approx(1.0)
    assert probs == pytest.approx(normalize(logprobs))
    assert body["label"] == labels[probs.index(max(probs))] and body["confidence"] == max(probs)
    assert all(lp < 0 for lp in logprobs)

    # the engine alone computes the same quantity (up to llama.cpp's batch-shape noise)
    from llamba_cli.engine import Request

    engine = make_engine(slots=1)
    [ref] = engine.run([Request(id=0, prompt=prompt, labels=tuple(labels))])
    ref_probs = normalize(ref.label_logprobs)
    assert body["label"] == labels[ref_probs.index(max(ref_probs))]
    assert max(abs(a - b) for a, b in zip(probs, ref_probs, strict=True)) < 0.1

    status, err = server.post("/v1/classify", {"prompt": prompt, "labels": ["only"]})
    assert status == 400 and err["error"]["param"] == "labels"


# -- concurrency, disconnects, the wait queue ------------------------------------------


def stream_timed(server: Server, body: dict[str, Any], out: dict[str, Any]) -> None:
    """POST a streaming completion; record each chunk's arrival time and the text."""
    client = server.client()
    times, parts, reasons = [], [], []
    start = time.monotonic()
    extra = {k: body.pop(k) for k in ("ignore_eos",) if k in body}
    for chunk in client.completions.create(model="m", stream=True, extra_body=extra, **body):
        if chunk.choices:
            times.append(time.monotonic() - start)
            parts.append(chunk.choices[0].text)
            if chunk.choices[0].finish_reason:
                reasons.append(chunk.choices[0].finish_reason)
    out.update(times=times, text="".join(parts), reasons=reasons)


# Greedy first tokens at 1 slot win by 3-8 nats for most of these (Gemma 3 270M), far
# above the ~1 nat llama.cpp's batch shape moves a logit.
PROMPTS = [
    "To be or not to",
    "Once upon a",
    "The quick brown fox jumps over the lazy",
    "1, 2, 3, 4, 5,",
    "Roses are red, violets are",
    "Twinkle, twinkle, little",
    "Water boils at a temperature of",
    "Monday, Tuesday, Wednesday,",
]


def test_requests_join_the_running_batch(server: Server) -> None:
    """4 clients on 4 slots: every one gets its first token before any one finishes."""
    results: list[dict[str, Any]] = [{} for _ in range(4)]
    threads = [
        threading.Thread(
            target=stream_timed,
            args=(server, {"prompt": p, "max_tokens": 12, "temperature": 0, "ignore_eos": True}, r),
        )
        for p, r in zip(PROMPTS, results, strict=False)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert all(r["reasons"] == ["length"] for r in results)
    first = max(r["times"][0] for r in results)
    last = min(r["times"][-1] for r in results)
    assert first < last


def test_eight_concurrent_streams(server: Server, one_slot_server: Server) -> None:
    """Eight streaming clients on 4 slots all finish; where the 1-slot reference's first
    token wins by a wide margin, the batched first token is the same."""
    ref_client = one_slot_server.client()
    refs = []
    for prompt in PROMPTS:
        r = ref_client.completions.create(
            model="m", prompt=prompt, max_tokens=2, temperature=0, logprobs=2
        )
        refs.append(r.choices[0])
    results: list[dict[str, Any]] = [{} for _ in PROMPTS]
    threads = [
        threading.Thread(
            target=stream_timed,
            args=(server, {"prompt": p, "max_tokens": 2, "temperature": 0}, r),
        )
        for p, r in zip(PROMPTS, results, strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    checked = 0
    for ref, got in zip(refs, results, strict=True):
        assert len(got["reasons"]) == 1 and got["reasons"][0] in ("stop", "length")
        lp = ref.logprobs
        assert lp is not None and lp.top_logprobs and lp.tokens
        top = sorted(lp.top_logprobs[0].values(), reverse=True)
        if len(top) == 2 and top[0] - top[1] > 3.0:  # well above llama.cpp's batch noise
            checked += 1
            assert got["text"].startswith(lp.tokens[0])
    assert checked >= 4  # the prompts are chosen so that most have a clear first token


def test_client_disconnect_mid_stream_frees_the_slot(server: Server) -> None:
    before = server.metrics()
    conn = server.connection()
    body = {
        "prompt": SHORT,
        "max_tokens": 400,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    conn.request(
        "POST",
        "/v1/completions",
        json.dumps(body),
        {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"},
    )
    resp = conn.getresponse()
    assert resp.status == 200
    seen = 0
    for raw in resp:
        if raw.startswith(b"data:"):
            seen += 1
            if seen == 3:
                break
    assert server.metrics()["llamba_requests_running"] == 1
    conn.sock.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]
    conn.close()
    assert wait_for(lambda: server.metrics()["llamba_requests_running"] == 0, timeout=30)
    after = server.metrics()
    generated = after["llamba_generation_tokens_total"] - before["llamba_generation_tokens_total"]
    assert generated < 400
    assert (
        after["llamba_requests_disconnected_total"]
        == before["llamba_requests_disconnected_total"] + 1
    )


def test_client_disconnect_while_waiting_for_a_whole_answer(server: Server) -> None:
    before = server.metrics()
    host, port = server.host_port
    body = json.dumps({"prompt": SHORT, "max_tokens": 400, "ignore_eos": True}).encode()
    sock = socket.create_connection((host, port))
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    assert wait_for(lambda: server.metrics()["llamba_requests_running"] == 1, timeout=30)
    sock.close()
    assert wait_for(lambda: server.metrics()["llamba_requests_running"] == 0, timeout=30)
    after = server.metrics()
    assert after["llamba_generation_tokens_total"] - before["llamba_generation_tokens_total"] < 400
    assert (
        after["llamba_requests_disconnected_total"]
        == before["llamba_requests_disconnected_total"] + 1
    )


def test_full_queue_answers_429_at_once(one_slot_server: Server) -> None:
    s = one_slot_server
    body = {"prompt": SHORT, "max_tokens": 500, "ignore_eos": True, "stream": True}
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
    running, waiting = s.connection(), s.connection()
    running.request("POST", "/v1/completions", json.dumps(body), headers)
    assert wait_for(lambda: s.metrics()["llamba_requests_running"] == 1)
    waiting.request("POST", "/v1/completions", json.dumps(body), headers)
    assert wait_for(lambda: s.metrics()["llamba_requests_waiting"] == 1)
    try:
        t0 = time.monotonic()
        status, headers_out, raw = s.request(
            "POST", "/v1/completions", {"prompt": SHORT, "max_tokens": 1}
        )
        assert time.monotonic() - t0 < 5
        assert status == 429
        assert int(headers_out["retry-after"]) >= 1
        assert json.loads(raw)["error"]["code"] == "rate_limit_exceeded"
        with pytest.raises(openai.RateLimitError):
            s.client().completions.create(model="m", prompt=SHORT, max_tokens=1)
        assert s.metrics()["llamba_requests_rejected_total"] >= 2
    finally:
        running.close()
        waiting.close()
    assert wait_for(
        lambda: (
            s.metrics()["llamba_requests_running"] == 0
            and s.metrics()["llamba_requests_waiting"] == 0
        )
    )


def test_a_shared_system_prompt_is_computed_once(server: Server) -> None:
    system = (
        "You are a terse assistant for a hardware shop. Answer every question in at most "
        "one sentence, name a product when you can, and never apologise."
    )
    questions = ["Do you sell hammers?", "What glue works on wood?", "Any cheap drills?"]
    before = server.metrics()
    results: list[dict[str, Any]] = [{} for _ in questions]

    def ask(question: str, out: dict[str, Any]) -> None:
        r = server.client().chat.completions.create(
            model="m",
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
            max_tokens=4,
            temperature=0,
        )
        out["usage"] = r.usage

    threads = [
        threading.Thread(target=ask, args=(q, r)) for q, r in zip(questions, results, strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    after = server.metrics()
    prompt = sum(r["usage"].prompt_tokens for r in results)
    evaluated = (
        after["llamba_prompt_tokens_evaluated_total"]
        - before["llamba_prompt_tokens_evaluated_total"]
    )
    reused = (
        after["llamba_prompt_tokens_reused_total"] - before["llamba_prompt_tokens_reused_total"]
    )
    assert reused >= 2 * 20  # the system prompt (>20 tokens) came from the cache
    assert evaluated < prompt


def test_metrics_exposition(server: Server) -> None:
    server.client().completions.create(model="m", prompt=SHORT, max_tokens=2)
    status, headers, raw = server.request("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    text = raw.decode()
    for name, kind in [
        ("llamba_requests_running", "gauge"),
        ("llamba_requests_waiting", "gauge"),
        ("llamba_generation_tokens_total", "counter"),
        ("llamba_prompt_tokens_total", "counter"),
        ("llamba_prompt_tokens_evaluated_total", "counter"),
        ("llamba_prompt_tokens_reused_total", "counter"),
        ("llamba_decode_seconds_total", "counter"),
        ("llamba_request_errors_total", "counter"),
        ("llamba_requests_rejected_total", "counter"),
        ("llamba_requests_disconnected_total", "counter"),
        ("llamba_http_requests_total", "counter"),
        ("llamba_time_to_first_token_seconds", "histogram"),
    ]:
        assert f"# TYPE {name} {kind}\n" in text, name
    for line in text.splitlines():
        if line and not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])  # every sample has a number
    metrics = server.metrics()
    assert metrics["llamba_generation_tokens_total"] > 0
    assert metrics['llamba_http_requests_total{endpoint="/v1/completions",status="200"}'] > 0
    status, _, raw = server.request("GET", "/v1/nothing-here")
    assert status == 404 and json.loads(raw)["error"]["type"] == "not_found_error"
