"""Pipeline behaviour as subprocesses: kill -9 and resume, fingerprints, shards, exit
codes, metrics, validate, duplicates and n samples."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest

from tests.cli_process import llamba

REPO = Path(__file__).resolve().parents[2]
FAST = ["--slots", "4", "--max-tokens", "6", "--temperature", "0"]


def write_prompts(path: Path, n: int, *, start: int = 0) -> Path:
    with path.open("wb") as f:
        for i in range(start, start + n):
            f.write(
                orjson.dumps({"id": f"row{i}", "prompt": f"Fact number {i} about the sea:"}) + b"\n"
            )
    return path


def ids_of(path: Path) -> list[str]:
    return pq.read_table(path, columns=["id"]).column("id").to_pylist()


def test_kill_9_at_random_moments_then_resume(tmp_path):
    """SIGKILL a running job several times, rerun it each time: at the end every input id
    is in the output exactly once and the file reads cleanly."""
    src = write_prompts(tmp_path / "in.jsonl", 60)
    out = tmp_path / "out.parquet"
    args = [
        sys.executable,
        "-m",
        "llamba_cli",
        "generate",
        str(src),
        "-o",
        str(out),
        "--flush-rows",
        "3",
        "--flush-seconds",
        "0.5",
        "--slots",
        "4",
        "--max-tokens",
        "24",
        "--temperature",
        "0",
    ]
    rng = random.Random(7)
    kills = 0
    for _ in range(4):
        proc = subprocess.Popen(
            args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(rng.uniform(2.0, 6.0))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        assert not out.exists() or proc.returncode == 0  # never a half-written output
    assert kills >= 2
    final = llamba(
        "generate",
        str(src),
        "-o",
        str(out),
        "--flush-rows",
        "3",
        "--slots",
        "4",
        "--max-tokens",
        "24",
        "--temperature",
        "0",
    )
    assert final.returncode == 0, final.stderr
    got = ids_of(out)
    assert sorted(got) == sorted(f"row{i}" for i in range(60))
    assert len(got) == len(set(got)) == 60
    assert not (tmp_path / "out.parquet.llamba-work").exists()
    # A finished job run again writes nothing new.
    again = llamba(
        "generate",
        str(src),
        "-o",
        str(out),
        "--slots",
        "4",
        "--max-tokens",
        "24",
        "--temperature",
        "0",
    )
    assert again.returncode == 0 and "60 already done" in again.stderr


def test_changed_fingerprint_refuses_to_resume(tmp_path):
    src = write_prompts(tmp_path / "in.jsonl", 4)
    out = tmp_path / "out.parquet"
    assert llamba("generate", str(src), "-o", str(out), *FAST).returncode == 0
    changed = llamba("generate", str(src), "-o", str(out), *FAST[:-1], "0.5")
    assert changed.returncode == 2
    assert "different job" in changed.stderr and "sampling" in changed.stderr
    forced = llamba("generate", str(src), "-o", str(out), *FAST[:-1], "0.5", "--overwrite")
    assert forced.returncode == 0, forced.stderr
    assert len(ids_of(out)) == 4


def test_shards_cover_the_input_exactly_once(tmp_path):
    src = write_prompts(tmp_path / "in.jsonl", 12)
    shard_ids = []
    for i in range(3):
        out = tmp_path / f"shard{i}.parquet"
        proc = llamba("generate", str(src), "-o", str(out), "--shard", f"{i}/3", *FAST)
        assert proc.returncode == 0, proc.stderr
        shard_ids.append(set(ids_of(out)))
    union = set().union(*shard_ids)
    assert union == {f"row{i}" for i in range(12)}
    assert sum(len(s) for s in shard_ids) == 12


def test_exit_codes_error_rows_and_max_errors(tmp_path):
    src = tmp_path / "in.jsonl"
    write_prompts(src, 3)
    with src.open("ab") as f:
        f.write(b"{not json\n")
        f.write(orjson.dumps({"id": "no-prompt", "text": "x"}) + b"\n")
    out = tmp_path / "out.parquet"
    proc = llamba("generate", str(src), "-o", str(out), *FAST)
    assert proc.returncode == 1, proc.stderr
    rows = {r["id"]: r for r in pq.read_table(out).to_pylist()}
    assert len(rows) == 5
    assert "invalid JSON" in rows["#3"]["error"]
    assert rows["no-prompt"]["error"] and rows["no-prompt"]["finish_reason"] == "error"
    assert rows["row0"]["error"] is None
    tolerant = llamba(
        "generate", str(src), "-o", str(tmp_path / "o2.parquet"), "--max-errors", "2", *FAST
    )
    assert tolerant.returncode == 0, tolerant.stderr
    strict = llamba(
        "generate", str(src), "-o", str(tmp_path / "o3.parquet"), "--max-errors", "0", *FAST
    )
    assert strict.returncode == 1 and "aborted" in strict.stderr
    usage = llamba("generate", str(src), "-o", str(tmp_path / "o4.parquet"), "--slots", "0")
    assert usage.returncode == 2


def test_retry_errors_reruns_only_failed_rows(tmp_path):
    src = tmp_path / "in.jsonl"
    write_prompts(src, 2)
    with src.open("ab") as f:
        f.write(orjson.dumps({"id": "late", "text": "no prompt yet"}) + b"\n")
    out = tmp_path / "out.parquet"
    assert llamba("generate", str(src), "-o", str(out), *FAST).returncode == 1
    write_prompts(src, 2)  # same rows...
    with src.open("ab") as f:  # ...and the broken row fixed
        f.write(orjson.dumps({"id": "late", "prompt": "The tide comes in"}) + b"\n")
    proc = llamba("generate", str(src), "-o", str(out), "--retry-errors", *FAST)
    assert proc.returncode == 0, proc.stderr
    rows = pq.read_table(out).to_pylist()
    assert sorted(r["id"] for r in rows) == ["late", "row0", "row1"]
    assert all(r["error"] is None for r in rows)


def test_metrics_json(tmp_path):
    src = write_prompts(tmp_path / "in.jsonl", 3)
    metrics = tmp_path / "m" / "metrics.json"
    proc = llamba(
        "generate", str(src), "-o", str(tmp_path / "o.jsonl"), "--metrics-json", str(metrics), *FAST
    )
    assert proc.returncode == 0, proc.stderr
    m = orjson.loads(metrics.read_bytes())
    assert m["rows_written"] == 3 and m["errors"] == 0 and m["exit_code"] == 0
    assert m["generated_tokens"] > 0 and m["wall_seconds"] > 0 and m["tokens_per_second"] > 0
    assert m["fingerprint"]["model"]["name"].endswith(".gguf")


def test_duplicate_ids_are_reported_not_doubled(tmp_path):
    src = write_prompts(tmp_path / "in.jsonl", 3)
    with src.open("ab") as f:
        f.write(orjson.dumps({"id": "row1", "prompt": "again"}) + b"\n")
    out = tmp_path / "o.parquet"
    proc = llamba("generate", str(src), "-o", str(out), *FAST)
    assert proc.returncode == 1
    assert "repeat an earlier id" in proc.stderr and "'row1'" in proc.stderr
    assert sorted(ids_of(out)) == ["row0", "row1", "row2"]


def test_n_samples_are_reproducible(tmp_path):
    src = write_prompts(tmp_path / "in.jsonl", 2)
    runs = []
    for k in range(2):
        out = tmp_path / f"o{k}.parquet"
        proc = llamba(
            "generate",
            str(src),
            "-o",
            str(out),
            "--n",
            "4",
            "--seed",
            "1",
            "--temperature",
            "0.9",
            "--max-tokens",
            "8",
            "--slots",
            "8",
        )
        assert proc.returncode == 0, proc.stderr
        runs.append(pq.read_table(out).to_pylist())
    assert [(r["id"], r["sample"]) for r in runs[0]] == [
        (f"row{i}", s) for i in range(2) for s in range(4)
    ]
    assert [r["text"] for r in runs[0]] == [r["text"] for r in runs[1]]
    assert len({r["text"] for r in runs[0] if r["id"] == "row0"}) > 1  # samples differ


def test_validate_catches_missing_column_and_too_long_prompt(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(
        orjson.dumps({"id": "a", "text": "short"})
        + b"\n"
        + orjson.dumps({"id": "b", "text": "word " * 400})
        + b"\n"
    )
    job = tmp_path / "job.toml"
    head = f'task = "generate"\ninput = "{src.name}"\noutput = "out.parquet"\n'
    job.write_text(head + '[prompt]\ntemplate = "{body}"\n')
    missing = llamba("validate", str(job))
    assert missing.returncode == 2 and "body" in missing.stderr
    job.write_text(head + 'ctx = 128\n[prompt]\ntemplate = "{text}"\n')
    long = llamba("validate", str(job))
    assert long.returncode == 1, long.stdout + long.stderr
    assert "too long: 1 rows" in long.stdout and "'b'" in long.stdout
    assert not (tmp_path / "out.parquet").exists()


@pytest.mark.parametrize("bad", ['task = "translate"', "tempreature = 1", 'slots = "many"'])
def test_bad_job_files(tmp_path, bad):
    job = tmp_path / "job.toml"
    job.write_text(
        f'task = "generate"\ninput = "x.jsonl"\n{bad}\n'
        if "task" not in bad
        else f'{bad}\ninput = "x.jsonl"\n'
    )
    proc = llamba("run", str(job))
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
