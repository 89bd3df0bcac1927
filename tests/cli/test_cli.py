"""The CLI through Typer's runner and as a subprocess: happy paths and one-line errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from llamba_cli.cli.app import app
from llamba_cli.engine import SamplingParams
from llamba_cli.job.columns import LOGPROB_TYPE, output_schema, rows_to_table
from llamba_cli.job.writer import _logprob_column
from tests.cli_process import llamba

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "sample_data"


def test_generate_through_typer_runner(tmp_path):
    out = tmp_path / "gen.parquet"
    result = CliRunner().invoke(
        app,
        [
            "generate",
            str(SAMPLE / "prompts.jsonl"),
            "-o",
            str(out),
            "--limit",
            "5",
            "--temperature",
            "0",
            "--max-tokens",
            "8",
            "--slots",
            "4",
            "--keep-columns",
            "prompt",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out).to_pylist()
    assert [r["id"] for r in rows] == ["p000", "p001", "p002", "p003", "p004"]  # input order
    for r in rows:
        assert r["error"] is None and r["finish_reason"] in ("stop", "length")
        assert 0 < r["completion_tokens"] <= 8 and r["prompt_tokens"] > 0
        assert r["prompt"].startswith(("Write", "Describe"))


def test_classify_jsonl_output_has_probabilities(tmp_path):
    out = tmp_path / "labels.jsonl"
    proc = llamba(
        "classify",
        str(SAMPLE / "reviews.csv"),
        "--labels",
        "positive,negative",
        "--template",
        "Review: {text}\nSentiment:",
        "-o",
        str(out),
        "--slots",
        "4",
    )
    assert proc.returncode == 0, proc.stderr
    rows = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert len(rows) == 16
    for r in rows:
        assert r["label"] in ("positive", "negative")
        assert abs(r["p_positive"] + r["p_negative"] - 1) < 1e-9
        assert r["confidence"] == max(r["p_positive"], r["p_negative"])
        assert r["logprob_positive"] < 0 and r["logprob_negative"] < 0


@pytest.mark.parametrize("job", ["generate.toml", "classify.toml"])
def test_example_jobs_run(tmp_path, job):
    out = tmp_path / f"{job}.parquet"
    proc = llamba(
        "run", str(REPO / "jobs" / job), "-o", str(out), "--metrics-json", str(tmp_path / "m.json")
    )
    assert proc.returncode == 0, proc.stderr
    table = pq.read_table(out)
    assert table.num_rows == 32 if job == "generate.toml" else 16
    metrics = orjson.loads((tmp_path / "m.json").read_bytes())
    assert metrics["rows_written"] == table.num_rows and metrics["exit_code"] == 0
    assert "rows written" in proc.stderr


def test_classify_job_is_mostly_right_on_sample_reviews(tmp_path):
    out = tmp_path / "c.parquet"
    proc = llamba("run", str(REPO / "jobs" / "classify.toml"), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = pq.read_table(out).to_pylist()
    accuracy = sum(r["label"] == r["gold"] for r in rows) / len(rows)
    assert accuracy >= 0.75, accuracy  # a 270M base model with a two-shot prompt


BAD_CASES = [
    (["generate", "sample_data/missing.jsonl", "-o", "x.parquet"], "no such file"),
    (
        ["generate", "sample_data/prompts.jsonl", "-o", "x.parquet", "--prompt-column", "nope"],
        "nope",
    ),
    (
        ["generate", "sample_data/prompts.jsonl", "-o", "x.parquet", "--bogus-flag"],
        "No such option",
    ),
    (
        [
            "generate",
            "sample_data/prompts.jsonl",
            "-o",
            "x.parquet",
            "--model",
            "/nonexistent.gguf",
        ],
        "model file not found",
    ),
    (
        ["generate", "sample_data/prompts.jsonl", "-o", "x.parquet", "--model", "README.md"],
        "not a GGUF",
    ),
    (["generate", "sample_data/prompts.jsonl", "-o", "x.txt"], "x.txt"),
    (["generate", "sample_data/prompts.jsonl", "-o", "x.parquet", "--top-p", "2"], "top-p"),
    (
        [
            "classify",
            "sample_data/reviews.parquet",
            "-o",
            "x.parquet",
            "--labels",
            "a,a",
            "--template",
            "{text}",
        ],
        "duplicate label",
    ),
    (
        ["classify", "sample_data/reviews.parquet", "-o", "x.parquet", "--template", "{text}"],
        "needs labels",
    ),
    (["generate", "sample_data/prompts.jsonl", "-o", "x.parquet", "--format", "nope"], "nope"),
    (["generate", "sample_data/prompts.jsonl", "-o", "x.parquet", "--shard", "3/2"], "shard"),
    (["run", "jobs/missing.toml"], "no such file"),
]


@pytest.mark.parametrize("args,needle", BAD_CASES, ids=[c[1] for c in BAD_CASES])
def test_bad_input_is_one_clear_line_and_exit_2(tmp_path, args, needle):
    args = [
        a.replace("x.parquet", str(tmp_path / "x.parquet")).replace(
            "x.txt", str(tmp_path / "x.txt")
        )
        for a in args
    ]
    proc = llamba(*args)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("llamba: error:") and needle in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x.parquet").exists()


def test_dry_run_renders_prompts_without_output(tmp_path):
    proc = llamba(
        "generate",
        "sample_data/prompts.jsonl",
        "--dry-run",
        "--limit",
        "2",
        "--system",
        "You write well.",
        "-o",
        str(tmp_path / "o.parquet"),
    )
    assert proc.returncode == 0, proc.stderr
    assert "p000" in proc.stdout and "You write well." in proc.stdout
    assert not (tmp_path / "o.parquet").exists()


def test_labels_from_a_file(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("positive\n\nnegative\n")
    out = tmp_path / "l.parquet"
    proc = llamba(
        "classify", str(SAMPLE / "reviews.parquet"), "--labels-file", str(labels),
        "--template", "Review: {text}\nSentiment:", "-o", str(out), "--limit", "3",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 3 and {"p_positive", "p_negative"} <= set(rows[0])


HAS_LOGPROBS = "logprobs" in {f.name for f in dataclasses.fields(SamplingParams)}


@pytest.mark.skipif(not HAS_LOGPROBS, reason="SamplingParams has no logprobs field here")
@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_logprobs_column(tmp_path, fmt):
    out = tmp_path / f"lp.{fmt}"
    proc = llamba(
        "generate", str(SAMPLE / "prompts.jsonl"), "-o", str(out), "--limit", "2",
        "--temperature", "0", "--max-tokens", "4", "--slots", "2", "--logprobs", "3",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    if fmt == "parquet":
        assert pq.read_schema(out).field("logprobs").type == LOGPROB_TYPE
        rows = pq.read_table(out).to_pylist()
    else:
        rows = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    for r in rows:
        entries = r["logprobs"]
        assert len(entries) == r["completion_tokens"] > 0
        for e in entries:
            tops = [t["logprob"] for t in e["top"]]
            assert len(tops) == 3 and tops == sorted(tops, reverse=True) and tops[0] <= 0
            assert e["logprob"] == pytest.approx(tops[0], abs=1e-6)  # greedy: the argmax
            assert e["token"] == e["top"][0]["token"]
        if r["finish_reason"] == "length":
            assert "".join(e["token"] for e in entries) == r["text"]


def test_logprobs_column_shape_without_the_engine():
    @dataclasses.dataclass
    class Entry:  # the engine's TokenLogprob contract
        token: int
        text: bytes
        logprob: float
        top: list

    entries = [Entry(5, b"Hi", -0.1, [(5, b"Hi", -0.1), (7, b"\xe2\x82", -2.5)])]
    column = _logprob_column(entries)
    assert column == [
        {"token": "Hi", "logprob": -0.1, "top": [
            {"token": "Hi", "logprob": -0.1}, {"token": "\ufffd", "logprob": -2.5}]}
    ]  # fmt: skip
    schema = output_schema(task="generate", logprobs=True)
    table = rows_to_table([{"id": "a", "logprobs": column}, {"id": "b"}], schema)
    assert table.schema == schema and table.column("logprobs").to_pylist()[1] is None
