"""Output store: incremental parts, atomic publish, resume, fingerprints, retries."""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llamba_cli.errors import OutputError, ResumeError
from llamba_cli.job.manifest import FINGERPRINT_KEY, preflight
from llamba_cli.job.store import OutputStore

FP = {"model": "gemma-270m", "temperature": 0.0, "task": "generate"}


def row(i: int | str, error: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"id": str(i), "text": None if error else f"out {i}", "error": error, **extra}


def read_rows(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def work_dir(out: Path) -> Path:
    return out.with_name(out.name + ".llamba-work")


def parts(out: Path) -> list[str]:
    return sorted(p.name for p in work_dir(out).iterdir() if p.name.startswith("part-"))


@pytest.fixture(params=["parquet", "jsonl"])
def out(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    return tmp_path / f"out.{request.param}"


def test_write_and_finalize(out: Path) -> None:
    store = OutputStore(out, fingerprint=FP)
    assert store.format == out.suffix[1:]
    assert store.done_count == 0
    for i in range(10):
        store.write(row(i, tokens=i * 2))
    assert store.finalize() == out
    assert read_rows(out) == [row(i, tokens=i * 2) for i in range(10)]
    assert not work_dir(out).exists()
    sidecar = orjson.loads((out.parent / f".{out.name}.llamba.json").read_bytes())
    assert sidecar["fingerprint"] == FP and sidecar["rows"] == 10 and sidecar["errors"] == 0
    if out.suffix == ".parquet":
        metadata = pq.read_schema(out).metadata
        assert orjson.loads(metadata[FINGERPRINT_KEY]) == FP
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(
        [out.name, f".{out.name}.llamba.json"]
    )


def test_nothing_at_output_path_before_finalize(out: Path) -> None:
    store = OutputStore(out, fingerprint=FP, flush_rows=3)
    for i in range(7):
        store.write(row(i))
    assert parts(out) == [f"part-00000{n}.{store.format}" for n in (0, 1)]  # 6 rows flushed
    store.flush()
    assert len(parts(out)) == 3
    assert not out.exists()
    manifest = orjson.loads((work_dir(out) / "manifest.json").read_bytes())
    assert manifest["fingerprint"] == FP and manifest["format"] == store.format
    store.close()
    assert not out.exists()


def test_time_based_flush(out: Path) -> None:
    store = OutputStore(out, fingerprint=FP, flush_rows=1000, flush_seconds=0.0)
    store.write(row(1))
    assert len(parts(out)) == 1


def test_resume_skips_done_ids_and_keeps_order(out: Path) -> None:
    first = OutputStore(out, fingerprint=FP)
    for i in range(5):
        first.write(row(i))
    first.close()

    second = OutputStore(out, fingerprint=FP)
    assert second.done_count == 5
    assert [second.is_done(str(i)) for i in range(7)] == [True] * 5 + [False] * 2
    for i in range(10):
        if not second.is_done(str(i)):
            second.write(row(i))
    second.finalize()
    assert [r["id"] for r in read_rows(out)] == [str(i) for i in range(10)]


def test_crash_after_flush_and_stray_temp_file(out: Path) -> None:
    store = OutputStore(out, fingerprint=FP)
    store.write(row("a"))
    store.write(row("b"))
    store.flush()
    store.write(row("lost"))  # buffered only: a kill loses it
    del store  # abandoned without close(), like a SIGKILL
    stray = work_dir(out) / f".part-000001.{out.suffix[1:]}.tmp"
    stray.write_bytes(b"half a part")

    again = OutputStore(out, fingerprint=FP)
    assert not stray.exists()
    assert again.done_count == 2
    assert again.is_done("a") and again.is_done("b") and not again.is_done("lost")
    again.write(row("lost"))
    again.finalize()
    assert [r["id"] for r in read_rows(out)] == ["a", "b", "lost"]


def test_fingerprint_mismatch_lists_changed_keys(out: Path) -> None:
    store = OutputStore(out, fingerprint=FP)
    store.write(row(1))
    store.close()
    changed = {**FP, "model": "other", "temperature": 0.7}
    with pytest.raises(ResumeError) as caught:
        OutputStore(out, fingerprint=changed)
    assert str(caught.value) == (
        f"'{out}' was produced by a different job (changed: model, temperature);"
        " rerun with --overwrite or choose another output path"
    )
    # the finished output is checked too (Parquet metadata, or the JSONL sidecar)
    OutputStore(out, fingerprint=FP).finalize()
    with pytest.raises(ResumeError, match=r"\(changed: seed\)"):
        OutputStore(out, fingerprint={**FP, "seed": 1})


def test_foreign_output_is_refused(out: Path) -> None:
    if out.suffix == ".parquet":
        pq.write_table(pa.table({"id": ["x"]}), out)
    else:
        out.write_text('{"id": "x"}\n')
    with pytest.raises(ResumeError, match="was not produced by llamba"):
        OutputStore(out, fingerprint=FP)


def test_overwrite_replaces_only_once_new_rows_are_published(out: Path) -> None:
    old = OutputStore(out, fingerprint=FP)
    old.write(row("old"))
    old.finalize()
    leftover = OutputStore(out, fingerprint=FP)
    leftover.write(row("extra"))
    leftover.close()  # now there is unfinished work too

    new_fp = {**FP, "model": "new"}
    store = OutputStore(out, fingerprint=new_fp, overwrite=True)
    assert store.done_count == 0 and not store.is_done("old")
    assert work_dir(out).exists()  # untouched until the first new part
    store.write(row("new"))
    store.flush()
    assert not out.exists()
    assert parts(out) == [f"part-000000.{store.format}"]
    store.finalize()
    assert read_rows(out) == [row("new")]
    assert OutputStore(out, fingerprint=new_fp).is_done("new")


def test_overwrite_with_no_rows_publishes_an_empty_output(out: Path) -> None:
    old = OutputStore(out, fingerprint=FP)
    old.write(row("old"))
    old.finalize()
    OutputStore(out, fingerprint=FP, overwrite=True).finalize()
    assert read_rows(out) == []


def test_retry_errors_keeps_newest_row_per_id(out: Path) -> None:
    first = OutputStore(out, fingerprint=FP)
    first.write(row(1))
    first.write(row(2, error="context too long"))
    first.write(row(3))
    first.finalize()

    plain = OutputStore(out, fingerprint=FP)
    assert plain.is_done("2") and plain.done_count == 3  # errors count as done by default
    plain.close()

    retry = OutputStore(out, fingerprint=FP, retry_errors=True)
    assert retry.done_count == 2
    assert retry.is_done("1") and not retry.is_done("2") and retry.is_done("3")
    retry.write(row(2))
    retry.write(row(4))
    retry.close()  # resumed from the work dir before finalizing

    resumed = OutputStore(out, fingerprint=FP, retry_errors=True)
    assert resumed.is_done("2") and resumed.done_count == 4
    resumed.finalize()
    assert read_rows(out) == [row(1), row(3), row(2), row(4)]
    sidecar = orjson.loads((out.parent / f".{out.name}.llamba.json").read_bytes())
    assert sidecar["rows"] == 4 and sidecar["errors"] == 0


def test_parts_with_differing_schemas_merge(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    store = OutputStore(out, fingerprint=FP)
    store.write({"id": "1", "error": None, "text": None, "n": 1, "probs": {"yes": 0.25}})
    store.flush()  # part 0: text is all-null, n is int, probs has one field
    store.write({"id": "2", "error": "boom", "text": "t", "n": 2.5, "probs": {"no": 0.5}})
    store.flush()  # part 1: error and text are strings, n is float, probs has another field
    store.write({"id": "3", "error": None, "extra": [1, 2], "mixed": "a"})
    store.write({"id": "4", "error": None, "extra": [], "mixed": 5})  # mixed: stored as text
    store.finalize()
    table = pq.read_table(out)
    assert table.schema.field("n").type == pa.float64()
    assert table.schema.field("text").type == pa.string()
    assert table.to_pylist() == [
        {"id": "1", "error": None, "text": None, "n": 1.0, "probs": {"yes": 0.25, "no": None},
         "extra": None, "mixed": None},
        {"id": "2", "error": "boom", "text": "t", "n": 2.5, "probs": {"yes": None, "no": 0.5},
         "extra": None, "mixed": None},
        {"id": "3", "error": None, "text": None, "n": None, "probs": None,
         "extra": [1, 2], "mixed": "a"},
        {"id": "4", "error": None, "text": None, "n": None, "probs": None,
         "extra": [], "mixed": "5"},
    ]  # fmt: skip


def test_jsonl_nested_values_round_trip(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    nested = {"id": "n", "error": None, "input": {"messages": [{"role": "user", "content": "é\n"}]},
              "labels": {"a": 0.1, "b": 0.9}, "tokens": [1, 2, 3]}  # fmt: skip
    store = OutputStore(out, fingerprint=FP)
    store.write(nested)
    store.finalize()
    assert read_rows(out) == [nested]
    assert len(out.read_bytes().splitlines()) == 1


def test_finished_output_reopened_counts_all_ids_done(out: Path) -> None:
    store = OutputStore(out, fingerprint=FP)
    for i in range(4):
        store.write(row(i, error="bad" if i == 2 else None))
    store.finalize()
    before = out.stat()
    content = out.read_bytes()

    again = OutputStore(out, fingerprint=FP)
    assert again.done_count == 4 and all(again.is_done(str(i)) for i in range(4))
    assert not again.is_done("4")
    assert again.finalize() == out
    after = out.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert out.read_bytes() == content
    assert not work_dir(out).exists()


def test_finished_output_grows_when_input_grows(out: Path) -> None:
    store = OutputStore(out, fingerprint=FP)
    store.write(row(0))
    store.write(row(1))
    store.finalize()

    grown = OutputStore(out, fingerprint=FP)
    grown.write(row(2))
    grown.flush()
    assert not out.exists()  # the finished file became part 0 of the new work
    assert parts(out) == [f"part-00000{n}.{grown.format}" for n in (0, 1)]
    grown.finalize()
    assert read_rows(out) == [row(0), row(1), row(2)]


def test_kill_after_publish_before_cleanup_is_recovered(out: Path) -> None:
    store = OutputStore(out, fingerprint=FP)
    store.write(row(0))
    store.flush()
    manifest_path = work_dir(out) / "manifest.json"
    manifest = orjson.loads(manifest_path.read_bytes())
    store.finalize()
    # recreate the state of a finalize killed between publishing and removing the work dir
    work_dir(out).mkdir()
    manifest_path.write_bytes(orjson.dumps({**manifest, "publishing": True}))
    again = OutputStore(out, fingerprint=FP)
    assert not work_dir(out).exists()
    assert again.is_done("0") and again.done_count == 1


def test_output_next_to_unfinished_work_is_refused(out: Path) -> None:
    store = OutputStore(out, fingerprint=FP)
    store.write(row(0))
    store.close()
    out.write_bytes(b"something else")
    with pytest.raises(OutputError, match="exists next to unfinished work"):
        OutputStore(out, fingerprint=FP)


def test_unknown_output_format(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="unknown output format"):
        OutputStore(tmp_path / "out.csv", fingerprint=FP)


def test_unwritable_location_fails_at_open(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with pytest.raises(OutputError, match=r"'.*out\.parquet': '.*not-a-dir' is not a dir"):
        OutputStore(blocker / "out.parquet", fingerprint=FP)


def test_missing_output_directories_are_created(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "out.jsonl"
    store = OutputStore(out, fingerprint=FP)
    store.write(row(1))
    store.finalize()
    assert read_rows(out) == [row(1)]


def test_write_failure_keeps_published_parts(out: Path) -> None:
    store = OutputStore(out, fingerprint=FP)
    store.write(row(0))
    store.flush()
    blocked = work_dir(out) / f"part-000001.{store.format}"
    blocked.mkdir()  # the next part cannot be renamed into place
    store.write(row(1))
    with pytest.raises(OutputError) as caught:
        store.flush()
    assert str(caught.value).startswith(f"cannot write '{out}': ")
    assert "\n" not in str(caught.value)
    blocked.rmdir()
    assert not any(p.name.endswith(".tmp") for p in work_dir(out).iterdir())
    del store, caught  # the run dies here, without close()
    gc.collect()
    again = OutputStore(out, fingerprint=FP)
    assert again.is_done("0") and not again.is_done("1")


# -- one run at a time, and a schema that depends on the job only ------------------------


def test_second_store_on_the_same_output_is_refused_naming_the_holder(out: Path) -> None:
    first = OutputStore(out, fingerprint=FP, flush_rows=1)
    first.write(row("a"))
    with pytest.raises(OutputError, match=rf"another llamba run \(pid {os.getpid()}\)"):
        OutputStore(out, fingerprint=FP)
    with pytest.raises(OutputError, match="another llamba run"):
        preflight(out, fingerprint=FP)
    first.close()
    again = OutputStore(out, fingerprint=FP)  # released by close()
    assert again.done_count == 1
    again.finalize()
    assert not (out.parent / f".{out.name}.llamba.lock").exists()


def test_output_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "out.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(OutputError, match="not a regular file"):
        OutputStore(fifo, fingerprint=FP)


SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("error", pa.string())])


@pytest.mark.parametrize(
    "rows",
    [[], [row(1), row(2)], [row(1, "bad"), row(2, "bad")]],
    ids=["no-rows", "no-errors", "all-errors"],
)
def test_parquet_schema_is_the_jobs_whatever_the_rows(tmp_path: Path, rows: list) -> None:
    out = tmp_path / "out.parquet"
    store = OutputStore(out, fingerprint=FP, schema=SCHEMA)
    for r in rows:
        store.write(r)
    store.finalize()
    assert pq.read_schema(out).remove_metadata() == SCHEMA
    assert pq.read_table(out).num_rows == len(rows)


def test_shard_outputs_read_together(tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    for i, rows in enumerate([[row(1)], [row(2, "bad")], []]):
        store = OutputStore(folder / f"s{i}.parquet", fingerprint=FP, schema=SCHEMA)
        for r in rows:
            store.write(r)
        store.finalize()
    for hidden in folder.glob(".*"):
        hidden.unlink()  # the sidecars
    assert sorted(pq.read_table(folder).column("id").to_pylist()) == ["1", "2"]


def test_values_that_do_not_fit_a_string_column_are_stored_as_json(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    schema = SCHEMA.append(pa.field("kept", pa.string()))
    store = OutputStore(out, fingerprint=FP, schema=schema)
    store.write(row(1, kept={"a": [1, 2]}))
    store.write(row(2, kept="plain"))
    store.finalize()
    assert pq.read_table(out).column("kept").to_pylist() == ['{"a":[1,2]}', "plain"]
