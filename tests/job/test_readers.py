"""Input readers: each format streams the right rows and ids; bad input fails early."""

from __future__ import annotations

import gzip
import os
import tracemalloc
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llamba_cli.errors import InputError
from llamba_cli.job.readers import InputRow, open_input


def write_jsonl(path: Path, lines: list[object | str]) -> Path:
    """Write objects as JSON lines; str items are written verbatim (for bad lines)."""
    with open(path, "wb") as stream:
        for line in lines:
            raw = line.encode() if isinstance(line, str) else orjson.dumps(line)
            stream.write(raw + b"\n")
    return path


# -- JSON Lines -------------------------------------------------------------------------


def test_jsonl_streams_rows_with_ids_and_json_types(tmp_path: Path) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    path = write_jsonl(
        tmp_path / "in.jsonl",
        [{"id": "a", "messages": messages, "n": 1}, "", "   ", {"id": 7, "messages": [], "n": 2.5}],
    )
    source = open_input(path)
    assert source.format == "jsonl"
    assert source.columns == ["id", "messages", "n"]
    assert source.id_column == "id"
    assert source.count_rows() == 2
    rows = list(source)
    assert rows == [
        InputRow(0, "a", {"id": "a", "messages": messages, "n": 1}, None),
        InputRow(1, "7", {"id": 7, "messages": [], "n": 2.5}, None),
    ]
    assert list(source) == rows  # iterating again re-reads from the start


def test_jsonl_without_id_column_uses_hash_and_position(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.ndjson", [{"prompt": "x"}, {"prompt": "y"}])
    source = open_input(path)
    assert source.id_column == "id"
    assert [(row.id, row.data) for row in source] == [
        ("#0", {"prompt": "x"}),
        ("#1", {"prompt": "y"}),
    ]


def test_bad_json_lines_become_error_rows_and_the_stream_goes_on(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "in.jsonl",
        [{"id": "a", "p": 1}, "{not json", "[1, 2]", {"p": 3}, {"id": None}, {"id": "z", "p": 4}],
    )
    rows = list(open_input(path))
    assert [row.id for row in rows] == ["a", "#1", "#2", "#3", "#4", "z"]
    assert rows[1].data is None and rows[1].error is not None
    assert rows[1].error.startswith("line 2: invalid JSON:")
    assert rows[2].data is None and rows[2].error == "line 3: expected a JSON object, got an array"
    # a row without an id (absent or null) is an ordinary row under its position
    assert rows[3] == InputRow(3, "#3", {"p": 3}, None)
    assert rows[4] == InputRow(4, "#4", {"id": None}, None)
    assert rows[5] == InputRow(5, "z", {"id": "z", "p": 4}, None)


def test_ids_are_decided_per_row_and_never_collide(tmp_path: Path) -> None:
    # A first row without an id does not switch the file to row numbers, and a row
    # without an id never takes a real row's id.
    path = write_jsonl(
        tmp_path / "in.jsonl",
        ["not json", {"id": "0", "p": 1}, {"p": 2}, {"id": "", "p": 3}, {"id": "#2", "p": 4},
         {"id": "#5", "p": 5}, {"id": "#007", "p": 6}],
    )  # fmt: skip
    rows = list(open_input(path))
    assert [row.id for row in rows] == ["#0", "0", "#2", "#3", "#4", "#5", "#007"]
    assert rows[4].error is not None and "#2" in rows[4].error  # someone else's #N
    assert [row.error for row in rows[5:]] == [None, None]  # its own #N, or not of that form
    assert len({row.id for row in rows}) == len(rows)


def test_jsonl_columns_come_from_the_first_objects(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", ["oops", {"text": "t"}, {"key": 1, "text": "u"}])
    source = open_input(path, id_column="key")
    assert source.columns == ["text", "key"]
    assert [row.id for row in source] == ["#0", "#1", "1"]


def test_jsonl_byte_order_mark_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + orjson.dumps({"id": "a", "p": 1}) + b"\n")
    source = open_input(path)
    assert source.columns == ["id", "p"] and source.count_rows() == 1
    assert list(source) == [InputRow(0, "a", {"id": "a", "p": 1}, None)]


def test_json_array_file_is_refused_with_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "in.json"
    path.write_text('[\n  {"id": 1, "prompt": "x"}\n]\n')
    with pytest.raises(InputError, match=r"JSON array.*JSON Lines"):
        open_input(path)


def test_gzipped_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl.gz"
    with gzip.open(path, "wb") as stream:
        stream.write(b'{"id": "q", "v": 1}\n\n{"id": "r", "v": 2}')  # no final newline
    source = open_input(path)
    assert source.count_rows() == 2
    assert [(row.id, row.data) for row in source] == [
        ("q", {"id": "q", "v": 1}),
        ("r", {"id": "r", "v": 2}),
    ]


def test_large_jsonl_streams_with_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    n = 200_000
    with open(path, "wb") as stream:
        for i in range(n):
            stream.write(orjson.dumps({"id": f"r{i}", "prompt": f"say something about {i}" * 3}))
            stream.write(b"\n")
    size = path.stat().st_size
    source = open_input(path)

    tracemalloc.start()
    try:
        assert source.count_rows() == n
        _, count_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        seen = 0
        last = None
        for row in source:
            assert row.error is None
            seen += 1
            last = row
        _, iter_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == n
    assert last is not None and last.id == f"r{n - 1}" and last.index == n - 1
    assert size > 20_000_000
    assert count_peak < size / 10
    assert iter_peak < size / 20


# -- Parquet ----------------------------------------------------------------------------


def test_parquet_streams_batches_and_formats_float_ids(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    table = pa.table(
        {
            "id": [1.0, 2.0, 3.5, None, 5.0],
            "text": ["a", "b", "c", "d", "e"],
            "meta": [{"k": i} for i in range(5)],
        }
    )
    pq.write_table(table, path, row_group_size=2)
    source = open_input(path, batch_rows=2)
    assert source.format == "parquet"
    assert source.columns == ["id", "text", "meta"]
    assert source.count_rows() == 5
    rows = list(source)
    assert [row.id for row in rows] == ["1", "2", "3.5", "#3", "5"]
    assert [row.index for row in rows] == [0, 1, 2, 3, 4]
    assert rows[0].data == {"id": 1.0, "text": "a", "meta": {"k": 0}}
    assert all(row.error is None for row in rows)


def test_parquet_custom_id_column(tmp_path: Path) -> None:
    path = tmp_path / "in.pq"
    pq.write_table(pa.table({"key": ["x", "y"], "id": [9, 8]}), path)
    assert [row.id for row in open_input(path, id_column="key")] == ["x", "y"]
    assert [row.id for row in open_input(path)] == ["9", "8"]


def test_corrupt_parquet_fails_at_open(tmp_path: Path) -> None:
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"PAR1 this is not really parquet")
    with pytest.raises(InputError, match=r"cannot read '.*bad\.parquet': not a valid Parquet file"):
        open_input(path)


# -- CSV --------------------------------------------------------------------------------


def test_csv_reads_values_as_written(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text('id,prompt,score\n007,"two\nlines",1.5\n8,"say ""hi""",\n')
    source = open_input(path, batch_rows=1)
    assert source.format == "csv"
    assert source.columns == ["id", "prompt", "score"]
    assert source.count_rows() is None
    rows = list(source)
    assert rows == [
        InputRow(0, "007", {"id": "007", "prompt": "two\nlines", "score": "1.5"}, None),
        InputRow(1, "8", {"id": "8", "prompt": 'say "hi"', "score": ""}, None),
    ]


def test_csv_bad_records_become_error_rows(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_bytes(b'\xef\xbb\xbfid,prompt\n1,ok\n2,too,many\n\n3,\xff\xfe\n4,"two\nlines"\n5\n')
    source = open_input(path)
    assert source.columns == ["id", "prompt"]  # the byte order mark is not part of "id"
    rows = list(source)
    assert [(row.id, row.error) for row in rows] == [
        ("1", None),
        ("#1", "line 3: expected 2 cells, got 3"),
        ("#2", "line 5: not valid UTF-8"),
        ("4", None),
        ("#4", "line 8: expected 2 cells, got 1"),
    ]
    assert rows[3].data == {"id": "4", "prompt": "two\nlines"}


def test_csv_header_only_has_no_rows_and_gzip_works(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("a,b\n")
    assert open_input(path).columns == ["a", "b"]
    assert list(open_input(path)) == []
    zipped = tmp_path / "in.csv.gz"
    with gzip.open(zipped, "wt") as stream:
        stream.write("a,b\n1,2\n")
    assert [row.data for row in open_input(zipped)] == [{"a": "1", "b": "2"}]


# -- Errors at open ---------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"cannot read '.*nope\.jsonl': no such file"):
        open_input(tmp_path / "nope.jsonl")


def test_directory(tmp_path: Path) -> None:
    folder = tmp_path / "dir.jsonl"
    folder.mkdir()
    with pytest.raises(InputError, match="is a directory"):
        open_input(folder)


def test_fifo_is_refused_instead_of_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "in.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="not a regular file"):
        open_input(fifo)


def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "x.txt"
    path.write_text("hello\n")
    with pytest.raises(InputError) as caught:
        open_input(path)
    assert str(caught.value) == (
        f"cannot read '{path}': unknown input format (use .jsonl, .parquet or .csv)"
    )


@pytest.mark.parametrize("name", ["in.jsonl", "in.csv", "in.parquet"])
def test_missing_id_column_names_column_and_available_ones(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if name.endswith(".jsonl"):
        write_jsonl(path, [{"a": 1, "b": 2}])
    elif name.endswith(".csv"):
        path.write_text("a,b\n1,2\n")
    else:
        pq.write_table(pa.table({"a": [1], "b": [2]}), path)
    with pytest.raises(InputError, match=r"no id column 'uid' \(columns: a, b\)"):
        open_input(path, id_column="uid")


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.csv"])
def test_empty_file_fails_at_open(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text("\n\n" if name.endswith(".jsonl") else "")
    with pytest.raises(InputError, match="file is empty"):
        open_input(path)


def test_truncated_gzip_fails_with_input_error(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl.gz"
    payload = gzip.compress(b"".join(orjson.dumps({"id": i}) + b"\n" for i in range(50_000)))
    path.write_bytes(payload[: len(payload) // 2])
    source = open_input(path)  # the first lines are intact
    with pytest.raises(InputError, match=r"cannot read '.*in\.jsonl\.gz'"):
        list(source)
