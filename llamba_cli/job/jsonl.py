"""The JSONL output format: a row as one line, parts merged into one file.

The Parquet counterparts are `job.columns.rows_to_table` and `merge_parquet_parts`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import orjson

_JSON_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY


def json_line(row: dict[str, Any]) -> bytes:
    """One output row as the JSON line a `.jsonl` output holds."""
    return orjson.dumps(row, default=str, option=_JSON_OPTIONS) + b"\n"


def merge_jsonl_parts(parts: list[Path], path: Path, keep: np.ndarray | None) -> None:
    """Write the parts' lines to a new file at `path` and fsync it; with `keep`, only
    the rows it marks (one flag per non-blank line of all the parts, in order)."""
    with open(path, "wb") as stream:
        _concat(parts, stream, keep)
        stream.flush()
        os.fsync(stream.fileno())


def _concat(parts: list[Path], out: BinaryIO, keep: np.ndarray | None) -> None:
    """Append the parts' lines to `out`, each part ending in a newline."""
    position = 0
    for part in parts:
        with open(part, "rb") as stream:
            if keep is None:
                last = b"\n"
                while block := stream.read(1 << 20):
                    out.write(block)
                    last = block[-1:]
                if last != b"\n":
                    out.write(b"\n")
                continue
            for line in stream:
                if not line.strip():
                    continue
                if keep[position]:
                    out.write(line if line.endswith(b"\n") else line + b"\n")
                position += 1
