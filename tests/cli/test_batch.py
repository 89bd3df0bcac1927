"""`llamba batch` / `task = "batch"`: OpenAI Batch files in and out, as subprocesses.

Output bodies are checked with the `openai` package's own response types, resume and
shards on `custom_id`, and the same request through `llamba serve` and `llamba batch`
at one slot gives the same body."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion

from llamba_cli.errors import ConfigError
from llamba_cli.job.execute import Job
from llamba_cli.job.spec import build_spec
from tests.cli_process import llamba
from tests.server.serving import start_server

REPO = Path(__file__).resolve().parents[2]
FAST = ["--slots", "4", "--ctx", "512", "--flash-attn", "on"]


def line(custom_id: Any, url: str, body: Any, method: str = "POST") -> dict[str, Any]:
    return {"custom_id": custom_id, "method": method, "url": url, "body": body}


def chat(text: str, **kw: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 6, **kw}


def write_lines(path: Path, lines: list[Any]) -> Path:
    with path.open("wb") as f:
        for item in lines:
            f.write(item if isinstance(item, bytes) else orjson.dumps(item))
            f.write(b"\n")
    return path


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(raw) for raw in path.read_bytes().splitlines() if raw.strip()]


MIXED = [
    line(
        "chat",
        "/v1/chat/completions",
        {
            "model": "gpt-4o-mini",  # accepted and ignored
            "messages": [
                {"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": "What colour is the sky?"},
            ],
            "max_tokens": 6,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 2,
        },
    ),
    line(
        "completion",
        "/v1/completions",
        {"prompt": "The capital of France is", "max_tokens": 5, "temperature": 0, "logprobs": 1},
    ),
    line(
        "classify",
        "/v1/classify",
        {"prompt": "Review: I loved every minute.\nSentiment:", "labels": ["positive", "negative"]},
    ),
    b'{"custom_id": "broken", "method": "POST", "url": ',
    line("unknown-url", "/v1/embeddings", {"input": "hello"}),
    line("invalid-body", "/v1/chat/completions", {"messages": [], "max_tokens": 4}),
    line("wrong-method", "/v1/completions", {"prompt": "x"}, method="GET"),
    line("too-long", "/v1/completions", {"prompt": "word " * 600, "max_tokens": 2}),
    line("chat", "/v1/completions", {"prompt": "a second line with a used custom_id"}),
    line("samples", "/v1/chat/completions", chat("Say hi.", n=2, seed=3, stream=True)),
]
MIXED_IDS = [
    "chat",
    "completion",
    "classify",
    "#3",  # unparseable: the row number stands in for its custom_id
    "unknown-url",
    "invalid-body",
    "wrong-method",
    "too-long",
    "samples",
]


def test_mixed_file_gives_openai_output_lines(tmp_path: Path) -> None:
    src = write_lines(tmp_path / "requests.jsonl", MIXED)
    out = tmp_path / "results.jsonl"
    proc = llamba("batch", str(src), "-o", str(out), *FAST)
    assert proc.returncode == 1, proc.stderr  # error lines and a duplicate custom_id
    assert "repeat an earlier id" in proc.stderr and "'chat'" in proc.stderr
    lines = read_lines(out)
    assert [x["custom_id"] for x in lines] == MIXED_IDS  # input order, the duplicate dropped
    for x in lines:
        assert list(x) == ["id", "custom_id", "response", "error"]
        assert x["id"].startswith("batch_req_")
        assert (x["response"] is None) != (x["error"] is None)
    by_id = {x["custom_id"]: x for x in lines}

    chat_line = by_id["chat"]["response"]
    assert chat_line["status_code"] == 200 and chat_line["request_id"].startswith("req_")
    reply = ChatCompletion.model_validate(chat_line["body"])
    assert reply.object == "chat.completion" and len(reply.choices) == 1
    assert reply.model == "gemma-3-270m-q4_k_m"  # the model that answered, not the body's
    assert reply.choices[0].logprobs is not None
    assert reply.choices[0].logprobs.content
    assert all(len(t.top_logprobs) == 2 for t in reply.choices[0].logprobs.content)
    assert reply.usage is not None and reply.usage.completion_tokens <= 6

    completion = Completion.model_validate(by_id["completion"]["response"]["body"])
    assert completion.object == "text_completion" and completion.choices[0].text
    assert completion.choices[0].logprobs is not None
    assert completion.usage is not None and completion.usage.completion_tokens <= 5

    verdict = by_id["classify"]["response"]["body"]
    assert verdict["object"] == "classification" and verdict["label"] == "positive"
    assert [x["label"] for x in verdict["labels"]] == ["positive", "negative"]
    assert abs(sum(x["probability"] for x in verdict["labels"]) - 1) < 1e-9

    samples = ChatCompletion.model_validate(by_id["samples"]["response"]["body"])
    assert [c.index for c in samples.choices] == [0, 1]  # n=2: one line, two choices

    errors = {cid: by_id[cid]["error"] for cid in MIXED_IDS[3:8]}
    assert "invalid JSON" in errors["#3"]["message"]
    assert "/v1/embeddings" in errors["unknown-url"]["message"]
    assert errors["invalid-body"]["message"].startswith("messages:")
    assert "POST" in errors["wrong-method"]["message"]
    assert "a sequence holds at most 512" in errors["too-long"]["message"]
    assert {e["code"] for e in errors.values()} == {"invalid_request_error"}


def test_parquet_columns_and_shards_on_custom_id(tmp_path: Path) -> None:
    lines = [
        line(f"gen-{i}", "/v1/completions", {"prompt": f"Fact {i} about rivers:", "max_tokens": 3})
        for i in range(6)
    ]
    lines.append(line("label", "/v1/classify", {"prompt": "It broke.", "labels": ["good", "bad"]}))
    lines.append(line("bad", "/v1/completions", {"prompt": "x", "temperature": 9}))
    src = write_lines(tmp_path / "requests.jsonl", lines)
    seen: list[str] = []
    for shard in ("0/2", "1/2"):
        out = tmp_path / "shards" / f"shard{shard[0]}.parquet"
        proc = llamba("batch", str(src), "-o", str(out), "--shard", shard, *FAST)
        assert proc.returncode in (0, 1), proc.stderr
        seen += pq.read_table(out, columns=["custom_id"]).column(0).to_pylist()
    assert sorted(seen) == sorted(x["custom_id"] for x in lines)  # each once, in one shard

    rows = {r["custom_id"]: r for r in pq.read_table(tmp_path / "shards").to_pylist()}
    for i in range(6):
        r = rows[f"gen-{i}"]
        body = json.loads(r["body"])
        assert r["error"] is None and r["status_code"] == 200 and r["url"] == "/v1/completions"
        assert r["text"] == body["choices"][0]["text"] == r["choices"][0]["text"]
        assert r["finish_reason"] == body["choices"][0]["finish_reason"]
        assert r["completion_tokens"] == body["usage"]["completion_tokens"] <= 3
        assert r["total_tokens"] == r["prompt_tokens"] + r["completion_tokens"]
    label = rows["label"]
    assert label["label"] in ("good", "bad") and label["text"] is None
    assert {x["label"] for x in label["labels"]} == {"good", "bad"}
    assert label["confidence"] == max(x["probability"] for x in label["labels"])
    bad = rows["bad"]
    assert bad["status_code"] is None and bad["body"] is None
    assert bad["error"]["code"] == "invalid_request_error"
    assert bad["error"]["message"].startswith("temperature:")


def test_retry_errors_reruns_a_fixed_line(tmp_path: Path) -> None:
    src = tmp_path / "requests.jsonl"
    good = line("a", "/v1/completions", {"prompt": "One, two,", "max_tokens": 2})
    write_lines(src, [good, line("b", "/v1/completions", {"prompt": "x", "n": 0})])
    out = tmp_path / "results.jsonl"
    first = llamba("batch", str(src), "-o", str(out), *FAST)
    assert first.returncode == 1, first.stderr
    assert [x["error"] is None for x in read_lines(out)] == [True, False]

    write_lines(src, [good, line("b", "/v1/completions", {"prompt": "Three,", "max_tokens": 2})])
    again = llamba("batch", str(src), "-o", str(out), *FAST)
    assert again.returncode == 0 and "2 already done" in again.stderr
    retried = llamba("batch", str(src), "-o", str(out), "--retry-errors", *FAST)
    assert retried.returncode == 0, retried.stderr
    lines = read_lines(out)
    assert [x["custom_id"] for x in lines] == ["a", "b"]  # b once: its new line replaced it
    assert lines[1]["error"] is None
    Completion.model_validate(lines[1]["response"]["body"])


def test_kill_9_mid_run_then_rerun_gives_each_custom_id_once(tmp_path: Path) -> None:
    ids = [f"req-{i:02d}" for i in range(24)]
    src = write_lines(
        tmp_path / "requests.jsonl",
        [line(cid, "/v1/completions", {"prompt": f"Story {cid}:", "max_tokens": 8}) for cid in ids],
    )
    out = tmp_path / "results.jsonl"
    work = tmp_path / "results.jsonl.llamba-work"
    args = ["batch", str(src), "-o", str(out), "--flush-rows", "2", *FAST]
    for parts_before_kill in (1, 3):
        proc = subprocess.Popen(
            [sys.executable, "-m", "llamba_cli", *args],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if work.is_dir() and len(list(work.glob("part-*.jsonl"))) >= parts_before_kill:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
        assert not out.exists()  # nothing half-written at the output path
    final = llamba(*args)
    assert final.returncode == 0, final.stderr
    assert "already done" in final.stderr  # it resumed
    got = [x["custom_id"] for x in read_lines(out)]
    assert sorted(got) == ids and len(set(got)) == len(got)


def test_same_body_as_the_server_at_one_slot(tmp_path: Path) -> None:
    """At one slot with whole prompts the computation is the same, so the bodies are
    equal but for their ids and timestamps."""
    requests = [
        (
            "/v1/chat/completions",
            chat("Name three birds.", temperature=0, max_tokens=8, logprobs=True, top_logprobs=2),
        ),
        (
            "/v1/completions",
            {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "logprobs": 2},
        ),
        (
            "/v1/classify",
            {
                "messages": [{"role": "user", "content": "Is the sea salty? Answer:"}],
                "labels": ["yes", "no"],
            },
        ),
        ("/v1/chat/completions", chat("Tell me a joke.", temperature=0.9, n=2, seed=11)),
    ]
    server = start_server("--slots", "1", "--ctx", "512", api_key=None)
    try:
        served = []
        for url, body in requests:
            status, answer = server.post(url, body)
            assert status == 200, answer
            served.append(answer)
    finally:
        server.stop()
    src = write_lines(
        tmp_path / "requests.jsonl",
        [line(f"r{i}", url, body) for i, (url, body) in enumerate(requests)],
    )
    out = tmp_path / "results.jsonl"
    proc = llamba("batch", str(src), "-o", str(out), "--slots", "1", "--ctx", "512", "-fa", "on")
    assert proc.returncode == 0, proc.stderr
    batched = [x["response"]["body"] for x in read_lines(out)]

    def comparable(body: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in body.items() if k not in ("id", "created")}

    for got, want in zip(batched, served, strict=True):
        assert got["id"].split("-")[0] == want["id"].split("-")[0]
        assert comparable(got) == comparable(want)


def test_example_job_shares_the_system_prompt(tmp_path: Path) -> None:
    """The sample file's first 8 lines: chat requests with one long system prompt,
    which is evaluated once, not per request."""
    metrics = tmp_path / "metrics.json"
    out = tmp_path / "results.parquet"
    proc = llamba(
        "run",
        str(REPO / "jobs" / "batch.toml"),
        "-o",
        str(out),
        "--limit",
        "8",
        "--metrics-json",
        str(metrics),
    )
    assert proc.returncode == 0, proc.stderr
    m = orjson.loads(metrics.read_bytes())
    assert m["rows_written"] == 8 and m["errors"] == 0
    chats = pq.read_table(out).to_pylist()
    assert {r["url"] for r in chats} == {"/v1/chat/completions"}
    system_tokens = min(r["prompt_tokens"] for r in chats) - 10  # the user turns are short
    assert m["prompt_tokens_reused"] >= 7 * system_tokens
    assert m["prompt_tokens_evaluated"] < m["prompt_tokens"] - 7 * system_tokens


def test_batch_settings_and_input_are_checked(tmp_path: Path) -> None:
    spec = build_spec({"task": "batch", "input": "in.jsonl"})
    assert spec.id_column == "custom_id"
    with pytest.raises(ConfigError, match="Job does not run 'batch' jobs"):
        Job(spec)  # the batch task needs the protocol layer's BatchJob
    with pytest.raises(ConfigError, match="temperature does not apply to a batch job"):
        build_spec({"task": "batch", "input": "in.jsonl", "temperature": 0.1})
    with pytest.raises(ConfigError, match="custom_id"):
        build_spec({"task": "batch", "input": "in.jsonl", "id_column": "id"})

    flag = llamba("batch", str(tmp_path / "in.jsonl"), "--max-tokens", "4", "-o", "x.jsonl")
    assert flag.returncode == 2 and "No such option" in flag.stderr

    csv = tmp_path / "requests.csv"
    csv.write_text("custom_id,method,url,body\nx,POST,/v1/completions,{}\n")
    proc = llamba("batch", str(csv), "-o", str(tmp_path / "out.jsonl"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"llamba: error: cannot read '{csv}' as a batch: a batch file is JSON Lines"
        " (one request a line: custom_id, method, url, body)"
    ]
