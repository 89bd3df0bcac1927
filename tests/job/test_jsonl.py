"""JSONL rows and the merge of JSONL parts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson

from llamba_cli.job.jsonl import json_line, merge_jsonl_parts


def test_a_row_is_one_line_of_json(tmp_path: Path) -> None:
    line = json_line({"id": "a\nb", "n": np.int64(3), "path": tmp_path, 1: [1.5]})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert orjson.loads(line) == {"id": "a\nb", "n": 3, "path": str(tmp_path), "1": [1.5]}


def test_parts_merge_into_whole_lines(tmp_path: Path) -> None:
    parts = [tmp_path / "p0", tmp_path / "p1", tmp_path / "p2"]
    parts[0].write_bytes(b'{"id":"a"}\n{"id":"b"}')  # no final newline
    parts[1].write_bytes(b"")
    parts[2].write_bytes(b'\n{"id":"c"}\n{"id":"b"}\n')  # a blank line is no row
    merged = tmp_path / "merged"
    merge_jsonl_parts(parts, merged, None)
    assert merged.read_bytes() == b'{"id":"a"}\n{"id":"b"}\n\n{"id":"c"}\n{"id":"b"}\n'
    keep = np.array([True, False, True, True])
    merge_jsonl_parts(parts, merged, keep)
    assert merged.read_bytes() == b'{"id":"a"}\n{"id":"c"}\n{"id":"b"}\n'
