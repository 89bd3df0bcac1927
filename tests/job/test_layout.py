"""The names of an output's files, and the checks on where it goes."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamba_cli.errors import OutputError
from llamba_cli.job.layout import OutputLayout, check_location


def test_files_sit_beside_the_output(tmp_path: Path) -> None:
    layout = OutputLayout.of(tmp_path / "out.NDJSON")
    assert layout.format == "jsonl"
    assert layout.work_dir == tmp_path / "out.NDJSON.llamba-work"
    assert layout.manifest == tmp_path / "out.NDJSON.llamba-work" / "manifest.json"
    assert layout.sidecar == tmp_path / ".out.NDJSON.llamba.json"
    assert layout.lock == tmp_path / ".out.NDJSON.llamba.lock"
    assert layout.publish_tmp.parent == tmp_path and layout.publish_tmp != layout.path
    with pytest.raises(OutputError, match=r"'.*out\.csv': unknown output format"):
        OutputLayout.of(tmp_path / "out.csv")


def test_parts_are_listed_in_number_order_and_of_the_outputs_format(tmp_path: Path) -> None:
    layout = OutputLayout.of(tmp_path / "out.parquet")
    layout.work_dir.mkdir()
    for number in (1_000_000, 2, 999_999):
        layout.part(number).touch()
    for other in ("part-000003.jsonl", ".part-000004.parquet.tmp", "manifest.json"):
        (layout.work_dir / other).touch()
    assert [p.name for p in layout.parts()] == [
        "part-000002.parquet",
        "part-999999.parquet",
        "part-1000000.parquet",
    ]


def test_a_location_that_can_never_be_written_is_refused(tmp_path: Path) -> None:
    check_location(tmp_path / "new" / "deeper" / "out.jsonl")  # created when opened
    with pytest.raises(OutputError, match="is a directory"):
        check_location(tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="is not a directory"):
        check_location(tmp_path / "file" / "out.jsonl")
