"""The output folder of a --ray run (`PartFolder`), without Ray: parts, resume, finish."""

from __future__ import annotations

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llamba_cli.errors import OutputError, ResumeError
from llamba_cli.job.ray_data.parts import MANIFEST, PartFolder

FP = {"task": "generate", "model": {"name": "m.gguf"}, "seed": 0}


def part(ids: list[str], errors: list[str | None]) -> pa.Table:
    """A block as actors return it: every part has the job's schema (typed `error`)."""
    return pa.table({"id": ids, "text": ["t"] * len(ids), "error": pa.array(errors, pa.string())})


def write(folder: PartFolder, table: pa.Table) -> None:
    flags = np.array([e is not None for e in table.column("error").to_pylist()])
    folder.write_part(table.column("id").to_pylist(), flags, table)


def test_parts_read_back_as_one_table_and_resume_skips_them(tmp_path):
    out = tmp_path / "out.parquet"
    folder = PartFolder(out, fingerprint=FP)
    assert folder.done_count == 0
    write(folder, part(["a", "b"], [None, None]))
    write(folder, part(["c"], [None]))
    (out / ".part-000002.parquet.tmp").write_bytes(b"half a part")  # a killed writer
    folder.close()
    again = PartFolder(out, fingerprint=FP)
    assert again.done_count == 3 and again.is_done("c") and not again.is_done("d")
    assert not (out / ".part-000002.parquet.tmp").exists()
    write(again, part(["d"], ["boom"]))
    assert again.finish() == (4, 1)
    table = pq.read_table(out)  # the manifest's leading underscore keeps it out
    assert sorted(table.column("id").to_pylist()) == ["a", "b", "c", "d"]
    manifest = orjson.loads((out / MANIFEST).read_bytes())
    assert manifest["rows"] == 4 and manifest["errors"] == 1 and manifest["fingerprint"] == FP


def test_a_different_job_or_a_file_at_the_path_is_refused(tmp_path):
    out = tmp_path / "out.parquet"
    first = PartFolder(out, fingerprint=FP)
    write(first, part(["a"], [None]))
    first.close()
    with pytest.raises(ResumeError, match=r"different job \(changed: seed\)"):
        PartFolder(out, fingerprint={**FP, "seed": 1})
    fresh = PartFolder(out, fingerprint={**FP, "seed": 1}, overwrite=True)
    assert fresh.done_count == 0 and not list(out.glob("part-*"))
    fresh.close()

    single = tmp_path / "local.parquet"
    single.write_bytes(b"a local run's file")
    with pytest.raises(ResumeError, match="is a file"):
        PartFolder(single, fingerprint=FP)
    stranger = tmp_path / "other.parquet"
    stranger.mkdir()
    (stranger / "data.parquet").write_bytes(b"x")
    with pytest.raises(ResumeError, match="not produced by llamba"):
        PartFolder(stranger, fingerprint=FP, overwrite=True)
    assert (stranger / "data.parquet").exists()
    with pytest.raises(OutputError, match="unknown output format"):
        PartFolder(tmp_path / "out.csv", fingerprint=FP)


def test_retried_error_rows_replace_their_old_rows(tmp_path):
    out = tmp_path / "out.jsonl"
    folder = PartFolder(out, fingerprint=FP)
    lines = [{"id": "a", "error": "boom"}, {"id": "b", "error": None}]
    payload = b"".join(orjson.dumps(row) + b"\n" for row in lines)
    folder.write_part(["a", "b"], np.array([True, False]), payload)
    folder.close()
    plain = PartFolder(out, fingerprint=FP)
    assert plain.is_done("a")  # without --retry-errors: done
    plain.close()
    retry = PartFolder(out, fingerprint=FP, retry_errors=True)
    assert not retry.is_done("a") and retry.is_done("b")
    retry.write_part(["a"], np.array([False]), orjson.dumps({"id": "a", "error": None}) + b"\n")
    assert retry.finish() == (2, 0)
    rows = [orjson.loads(line) for p in sorted(out.glob("part-*.jsonl")) for line in p.open("rb")]
    assert sorted((r["id"], r["error"]) for r in rows) == [("a", None), ("b", None)]


def test_one_run_at_a_time(tmp_path):
    out = tmp_path / "out.parquet"
    folder = PartFolder(out, fingerprint=FP)
    with pytest.raises(OutputError, match="being written by another llamba run"):
        PartFolder(out, fingerprint=FP)
    folder.close()
    assert not (tmp_path / ".out.parquet.llamba.lock").exists()
    PartFolder(out, fingerprint=FP).close()
