"""Starting and stopping `llamba serve`: bad options, loading, SIGTERM draining."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.cli_process import llamba
from tests.server.serving import API_KEY, Server, start_server


def test_refuses_a_public_address_without_a_key() -> None:
    r = llamba("serve", "--host", "0.0.0.0", "--port", "0")
    assert r.returncode == 2
    assert r.stderr.strip().startswith("llamba: error: refusing to serve on 0.0.0.0")
    assert len(r.stderr.strip().splitlines()) == 1 and r.stdout == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--api-key-file", "/nonexistent/key"), "cannot read --api-key-file"),
        (("--api-key", "a", "--api-key-file", "b"), "either --api-key or --api-key-file"),
        (("--model", "/nonexistent/model.gguf"), "model file not found"),
        (("--port", "70000"), "port must be between"),
        (("--slots", "0"), "slots must be between"),
    ],
)
def test_bad_options_are_one_line(args: tuple[str, ...], message: str) -> None:
    r = llamba("serve", "--port", "0", *args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_model_that_fails_to_load_exits_cleanly(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    server = start_server("--model", str(bad), wait=False)
    code = server.proc.wait(120)
    assert code == 2
    log = server.log()
    assert "llamba: error: failed to load model" in log and "Traceback" not in log


def test_api_key_file(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("from-a-file\n")
    server = start_server("--slots", "1", "--ctx", "128", "--api-key-file", str(key), api_key=None)
    try:
        assert server.request("GET", "/v1/models")[0] == 401
        server.api_key = "from-a-file"
        assert server.request("GET", "/v1/models")[0] == 200
    finally:
        server.stop()


def read_stream(resp: Any, events: list[Any], first: threading.Event) -> None:
    try:
        for raw in resp:
            line = raw.decode().strip()
            if line.startswith("data:"):
                data = line[5:].strip()
                events.append(data if data == "[DONE]" else json.loads(data))
                first.set()
    except OSError:
        pass
    first.set()


def open_stream(server: Server, body: dict[str, Any]) -> tuple[list[Any], threading.Event]:
    conn = server.connection()
    conn.request(
        "POST",
        "/v1/completions",
        json.dumps({**body, "stream": True}),
        {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"},
    )
    resp = conn.getresponse()
    assert resp.status == 200
    events: list[Any] = []
    first = threading.Event()
    threading.Thread(target=read_stream, args=(resp, events, first), daemon=True).start()
    return events, first


def refused(server: Server) -> bool:
    try:
        socket.create_connection(server.host_port, timeout=1).close()
    except OSError:
        return True
    return False


def test_sigterm_finishes_running_requests_then_exits() -> None:
    server = start_server("--slots", "2", "--ctx", "256")
    events, first = open_stream(
        server, {"prompt": "Count: one, two,", "max_tokens": 16, "ignore_eos": True}
    )
    assert first.wait(60)
    server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 60
    while not refused(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert refused(server)  # no new connections once draining
    assert server.proc.wait(60) == 0
    assert events[-1] == "[DONE]"
    reasons = [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"]]
    assert reasons[-1] == "length"  # the running request was finished, not cut
    assert "llamba: stopped" in server.log()


def test_sigterm_aborts_what_outlasts_the_drain() -> None:
    server = start_server("--slots", "1", "--ctx", "2048", "--drain-seconds", "1")
    events, first = open_stream(
        server, {"prompt": "Count: one, two,", "max_tokens": 2000, "ignore_eos": True}
    )
    assert first.wait(60)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(60) == 0
    assert "[DONE]" not in events
    assert len(events) < 2000
    assert "llamba: stopped" in server.log()


def test_health_is_503_while_loading(model_path: Path) -> None:
    """The app itself, in this process: /health answers before the model is loaded."""
    import urllib.error
    import urllib.request

    import uvicorn

    from llamba_cli.engine import EngineConfig
    from llamba_cli.server import Runtime, ServerConfig, create_app
    from llamba_cli.server.serve import bind, url_of

    release = threading.Event()

    class SlowRuntime(Runtime):
        def _load(self) -> None:
            release.wait(60)
            super()._load()

    config = ServerConfig(
        engine=EngineConfig(model_path=str(model_path), slots=1, n_ctx_seq=128, flash_attn="on")
    )
    runtime = SlowRuntime(config, log=lambda _: None)
    sock = bind("127.0.0.1", 0)
    url = url_of(sock)
    server = uvicorn.Server(uvicorn.Config(create_app(runtime), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()

    def get(path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(url + path, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        status, body = get("/health")
        assert status == 503 and body["status"] == "loading"
        status, body = get("/v1/models")
        assert status == 503 and body["error"]["code"] == "loading"
        release.set()
        deadline = time.monotonic() + 60
        while get("/health")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert get("/health") == (200, {"status": "ok"})
        assert get("/v1/models")[0] == 200
    finally:
        release.set()
        server.should_exit = True
        thread.join(60)
        sock.close()


STRUCTURED = {
    "model": "llamba",
    "messages": [{"role": "user", "content": "A book: its title and a rating."}],
    "max_tokens": 24,
    "temperature": 0,
    "response_format": {
        "type": "json_schema",
        "json_schema": {
            "name": "book",
            "schema": {
                "type": "object",
                "properties": {"title": {"type": "string", "maxLength": 8}},
                "required": ["title"],
            },
        },
    },
}


def _structured_reply(server: Server) -> dict[str, Any]:
    status, body = server.post("/v1/chat/completions", STRUCTURED)
    assert status == 200, body
    reply: dict[str, Any] = json.loads(body["choices"][0]["message"]["content"])
    return reply


def test_grammar_vocabulary_is_built_once_ready_then_taken_from_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Structured output needs tables over the whole vocabulary (a second to build):
    a server builds them in the background once it is ready and stores them, and the
    next server adopts the stored ones before it says ready."""
    monkeypatch.setenv("LLAMBA_CACHE_DIR", str(tmp_path))
    first = start_server("--slots", "1", "--ctx", "256")
    try:
        deadline = time.monotonic() + 120
        while "grammar vocabulary built" not in first.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        log = first.log()
        assert "grammar vocabulary built (stored in" in log, log
        assert "grammar vocabulary from the cache" not in log
        assert len(list(tmp_path.glob("grammar-vocab-*.npz"))) == 1
        assert set(_structured_reply(first)) == {"title"}
    finally:
        first.stop()

    second = start_server("--slots", "1", "--ctx", "256")
    try:
        assert set(_structured_reply(second)) == {"title"}
        log = second.log()
        assert "grammar vocabulary from the cache" in log, log
        assert "grammar vocabulary built" not in log
    finally:
        second.stop()
