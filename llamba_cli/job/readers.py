"""Streaming readers for the input files of a job: JSON Lines, Parquet and CSV.

`open_input` checks everything that can be checked up front (the file exists, is a
regular file and readable, its format is known, the header or schema is intact, an
explicit id column exists) and raises `InputError` with one line naming the path, so
a job never starts on an input it cannot read.  Iterating an `InputSource` then
streams `InputRow`s in file order with memory bounded by one batch (one line for
JSON Lines, one record for CSV), whatever the file size.  A row that cannot be read
(invalid JSON, a CSV line with the wrong number of cells) does not stop the job: it
comes out as an `InputRow` with `data=None` and `error` set, and the job writes it
as an error row.

Ids are strings, decided row by row:

- a row whose id column (`id`, or the `id_column` given) holds a value has that
  value as its id: strings as they are, numbers in decimal (3.0 -> "3"), booleans as
  "true"/"false", lists and objects as compact JSON;
- a row without one (no such column, null, an empty string, or a line that cannot
  be parsed) gets `#N`, N being its 0-based position among the input's rows;
- so that the two never meet, an id of the form `#N` given in the data is accepted
  only on the row at position N (where it is the id the row would get anyway);
  anywhere else the row becomes an error row under its own `#N`.

Because resuming matches rows by id, rows without ids can only be resumed if the
input is unchanged.
"""

from __future__ import annotations

import csv
import gzip
import io
import re
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson

from llamba_cli.errors import InputError

InputFormat = Literal["jsonl", "parquet", "csv"]

# Longest suffixes first, so "x.jsonl.gz" is not taken for a plain ".gz".
_SUFFIXES: tuple[tuple[str, InputFormat, bool], ...] = (
    (".jsonl.gz", "jsonl", True),
    (".ndjson.gz", "jsonl", True),
    (".json.gz", "jsonl", True),
    (".csv.gz", "csv", True),
    (".jsonl", "jsonl", False),
    (".ndjson", "jsonl", False),
    (".json", "jsonl", False),
    (".parquet", "parquet", False),
    (".pq", "parquet", False),
    (".csv", "csv", False),
)

# How many non-blank lines of a JSON Lines file are looked at to find its columns.
_JSONL_SNIFF_LINES = 100
_COUNT_BLOCK_BYTES = 1 << 18
_BOM = b"\xef\xbb\xbf"
# The ids given to rows without one: "#" and the row's position, no leading zeros.
_GENERATED_ID = re.compile(r"#(0|[1-9][0-9]*)")

# gzip reports a damaged stream as OSError (BadGzipFile), zlib.error or EOFError.
_STREAM_ERRORS = (OSError, EOFError, zlib.error)

_JSON_KINDS: dict[type, str] = {
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


def generated_id(index: int) -> str:
    """The id of the row at 0-based `index` when the row has none of its own."""
    return f"#{index}"


@dataclass(frozen=True)
class InputRow:
    """One row of the input, in file order.

    `index` is the 0-based position among the file's rows (blank lines do not
    count).  `data` holds the row's columns as JSON-like Python values, or None when
    the row could not be parsed; `error` says why the row cannot be used, or is None.
    `id` follows the rules in this module's docstring.
    """

    index: int
    id: str
    data: dict[str, Any] | None
    error: str | None


class InputSource:
    """A readable input file; iterate it to stream its rows (again from the start each time).

    `columns` lists the column names: from the schema or header for Parquet and CSV,
    from the objects among the first lines for JSON Lines.  `id_column` is the column
    ids are read from (`id` unless another was given).
    """

    format: InputFormat

    def __init__(self, path: Path, *, id_column: str | None, batch_rows: int) -> None:
        self.path = path
        self.batch_rows = batch_rows
        self.columns: list[str] = self._read_columns()
        self.id_column: str = _resolve_id_column(path, self.columns, id_column)

    def count_rows(self) -> int | None:
        """The number of rows, if it can be known without parsing the file; else None."""
        return None

    def __iter__(self) -> Iterator[InputRow]:
        raise NotImplementedError

    def _read_columns(self) -> list[str]:
        raise NotImplementedError

    def _row(self, index: int, data: dict[str, Any]) -> InputRow:
        own = generated_id(index)
        row_id = _id_text(data.get(self.id_column))
        if row_id is None:
            return InputRow(index, own, data, None)
        if row_id != own and _GENERATED_ID.fullmatch(row_id):
            reason = (
                f"id {row_id!r} has the form #N that rows without an id get, and this row is"
                f" not row {row_id[1:]}; give it another id"
            )
            return InputRow(index, own, data, reason)
        return InputRow(index, row_id, data, None)

    def _bad_row(self, index: int, reason: str) -> InputRow:
        return InputRow(index, generated_id(index), None, reason)

    def _fail(self, reason: str) -> InputError:
        return InputError(f"cannot read '{self.path}': {reason}")


def open_input(
    path: str | Path, *, id_column: str | None = None, batch_rows: int = 1024
) -> InputSource:
    """Open an input file for streaming, checking it is readable before any work starts.

    The format comes from the extension: .jsonl/.ndjson/.json (JSON Lines, also
    gzipped as .gz), .parquet/.pq, .csv (also .csv.gz).  Ids come from `id_column`,
    else the column `id`, row by row (see the module docstring).  Raises
    `InputError` for an unknown extension, a missing, unreadable, non-regular or
    empty file, a corrupt Parquet file, a JSON array file, or an `id_column` the
    file does not have.
    """
    path = Path(path).expanduser()
    fmt, gzipped = _detect_format(path)
    if not path.exists():
        raise InputError(f"cannot read '{path}': no such file")
    if path.is_dir():
        raise InputError(f"cannot read '{path}': is a directory")
    if not path.is_file():  # a FIFO or a device would block or never end
        raise InputError(f"cannot read '{path}': not a regular file")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise InputError(f"cannot read '{path}': {exc.strerror or exc}") from None
    if batch_rows < 1:
        raise ValueError("batch_rows must be at least 1")
    if fmt == "jsonl":
        return JsonlSource(path, gzipped=gzipped, id_column=id_column, batch_rows=batch_rows)
    if fmt == "parquet":
        return ParquetSource(path, id_column=id_column, batch_rows=batch_rows)
    return CsvSource(path, gzipped=gzipped, id_column=id_column, batch_rows=batch_rows)


class JsonlSource(InputSource):
    """JSON Lines: one JSON object per line; blank lines are skipped.

    A line that is not valid JSON, or not an object, becomes an error row and the
    stream goes on.  Values keep their JSON types (lists and objects stay lists and
    dicts).  A UTF-8 byte order mark before the first line is ignored.  A file whose
    first line opens a JSON array (`[`) is refused: that is a JSON document, not
    JSON Lines.
    """

    format: InputFormat = "jsonl"

    def __init__(
        self, path: Path, *, gzipped: bool, id_column: str | None, batch_rows: int
    ) -> None:
        self.gzipped = gzipped
        super().__init__(path, id_column=id_column, batch_rows=batch_rows)

    def _open(self) -> io.BufferedIOBase:
        if self.gzipped:
            return gzip.GzipFile(
                self.path, "rb"
            )  # GzipFile is a BinaryIO; gzip.open is typed loosely
        return open(self.path, "rb")

    def _lines(self, stream: io.BufferedIOBase) -> Iterator[tuple[int, bytes]]:
        """(line number, line) of the non-blank lines, the byte order mark removed."""
        for line_number, raw in enumerate(stream, start=1):
            if line_number == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            if raw.strip():
                yield line_number, raw

    def _read_columns(self) -> list[str]:
        sniffed = 0
        columns: dict[str, None] = {}
        try:
            with self._open() as stream:
                for _, raw in self._lines(stream):
                    if sniffed == 0 and raw.lstrip().startswith(b"["):
                        raise self._fail(
                            "it holds a JSON array; llamba reads JSON Lines, one object per"
                            " line (convert it with: jq -c '.[]')"
                        )
                    sniffed += 1
                    try:
                        value = orjson.loads(raw)
                    except orjson.JSONDecodeError:
                        value = None
                    if isinstance(value, dict):
                        columns.update(dict.fromkeys(value))
                    if sniffed >= _JSONL_SNIFF_LINES:
                        break
        except _STREAM_ERRORS as exc:
            raise self._fail(_stream_error(exc)) from None
        if sniffed == 0:
            raise self._fail("file is empty (no JSON lines)")
        return list(columns)

    def count_rows(self) -> int | None:
        """Count non-blank lines, reading binary blocks so memory stays constant."""
        count = 0
        pending = False  # the line not yet ended by a newline has non-blank content
        first = True
        try:
            with self._open() as stream:
                while block := stream.read(_COUNT_BLOCK_BYTES):
                    if first and block.startswith(_BOM):
                        block = block[len(_BOM) :]
                    first = False
                    pieces = block.split(b"\n")
                    for piece in pieces[:-1]:
                        if pending or piece.strip():
                            count += 1
                        pending = False
                    pending = pending or bool(pieces[-1].strip())
        except _STREAM_ERRORS as exc:
            raise self._fail(_stream_error(exc)) from None
        return count + 1 if pending else count

    def __iter__(self) -> Iterator[InputRow]:
        index = 0
        try:
            with self._open() as stream:
                for line_number, raw in self._lines(stream):
                    yield self._parse_line(index, line_number, raw)
                    index += 1
        except _STREAM_ERRORS as exc:
            raise self._fail(_stream_error(exc)) from None

    def _parse_line(self, index: int, line_number: int, raw: bytes) -> InputRow:
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            # orjson counts lines within this one line; only the column is meaningful.
            return self._bad_row(
                index, f"line {line_number}: invalid JSON: {exc.msg} at column {exc.colno}"
            )
        if not isinstance(value, dict):
            return self._bad_row(
                index, f"line {line_number}: expected a JSON object, got {_json_kind(value)}"
            )
        return self._row(index, value)


class ParquetSource(InputSource):
    """Parquet, streamed one record batch of `batch_rows` rows at a time.

    Arrow is imported by the methods that read Parquet (here and in the other job
    modules): a JSON Lines or CSV job never loads it.  Its import is 0.1-0.2 s of
    work that, beside a model loading, slowed the load by about half as much.
    """

    format: InputFormat = "parquet"

    def _read_columns(self) -> list[str]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            with pq.ParquetFile(self.path) as parquet:
                self._num_rows: int = parquet.metadata.num_rows
                self.schema: pa.Schema = parquet.schema_arrow
                return list(parquet.schema_arrow.names)
        except (pa.ArrowException, OSError) as exc:
            raise self._fail(f"not a valid Parquet file ({_first_line(exc)})") from None

    def count_rows(self) -> int | None:
        """The row count from the Parquet footer (read at open; no data is read)."""
        return self._num_rows

    def __iter__(self) -> Iterator[InputRow]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        index = 0
        try:
            with pq.ParquetFile(self.path) as parquet:
                for batch in parquet.iter_batches(batch_size=self.batch_rows):
                    for data in batch.to_pylist():
                        yield self._row(index, data)
                        index += 1
        except (pa.ArrowException, OSError) as exc:
            raise self._fail(f"corrupt Parquet data ({_first_line(exc)})") from None


class CsvSource(InputSource):
    """CSV with a header line, streamed record by record (Python's `csv` module).

    Every value is read as a string, exactly as written (an empty cell is ""): CSV has
    no types, and inferring them would turn an id like "007" into 7.  Quoted values
    may span lines; blank lines are skipped; a UTF-8 byte order mark is ignored.  A
    record with the wrong number of cells, invalid UTF-8 or broken quoting becomes an
    error row and the stream goes on.
    """

    format: InputFormat = "csv"

    def __init__(
        self, path: Path, *, gzipped: bool, id_column: str | None, batch_rows: int
    ) -> None:
        self.gzipped = gzipped
        super().__init__(path, id_column=id_column, batch_rows=batch_rows)

    def _open(self) -> io.TextIOWrapper:
        raw: Any = gzip.GzipFile(self.path, "rb") if self.gzipped else open(self.path, "rb")  # noqa: SIM115
        # surrogateescape: a bad byte spoils its own record (an error row), not the file.
        return io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline="")

    def _read_columns(self) -> list[str]:
        _allow_long_fields()
        try:
            with self._open() as stream:
                header = next(csv.reader(stream), None)
        except _STREAM_ERRORS as exc:
            raise self._fail(_stream_error(exc)) from None
        except csv.Error as exc:
            raise self._fail(f"not a valid CSV header ({exc})") from None
        if not header:
            raise self._fail("file is empty (no header line)")
        if any(_has_bad_bytes(name) for name in header):
            raise self._fail("the header line is not valid UTF-8")
        if len(set(header)) != len(header):
            twice = next(name for name in header if header.count(name) > 1)
            raise self._fail(f"column {twice!r} appears twice in the header")
        return header

    def __iter__(self) -> Iterator[InputRow]:
        _allow_long_fields()
        width = len(self.columns)
        index = 0
        try:
            with self._open() as stream:
                reader = csv.reader(stream)
                next(reader, None)  # the header
                while True:
                    try:
                        cells = next(reader)
                    except StopIteration:
                        return
                    except csv.Error as exc:
                        yield self._bad_row(index, f"line {reader.line_num}: malformed CSV: {exc}")
                        index += 1
                        continue
                    if not cells:
                        continue
                    if len(cells) != width:
                        reason = f"line {reader.line_num}: expected {width} cells, got {len(cells)}"
                        yield self._bad_row(index, reason)
                    elif any(_has_bad_bytes(cell) for cell in cells):
                        yield self._bad_row(index, f"line {reader.line_num}: not valid UTF-8")
                    else:
                        yield self._row(index, dict(zip(self.columns, cells, strict=True)))
                    index += 1
        except _STREAM_ERRORS as exc:
            raise self._fail(_stream_error(exc)) from None


def _allow_long_fields() -> None:
    # The csv module refuses fields over 128 KiB by default; a long prompt is the
    # job's to judge (by size, as a row error), not the reader's.
    if csv.field_size_limit() < sys.maxsize // 2:
        csv.field_size_limit(sys.maxsize // 2)


def _has_bad_bytes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _detect_format(path: Path) -> tuple[InputFormat, bool]:
    name = path.name.lower()
    for suffix, fmt, gzipped in _SUFFIXES:
        if name.endswith(suffix):
            return fmt, gzipped
    raise InputError(f"cannot read '{path}': unknown input format (use .jsonl, .parquet or .csv)")


def _resolve_id_column(path: Path, columns: list[str], id_column: str | None) -> str:
    if id_column is None:
        return "id"
    if id_column not in columns:
        available = ", ".join(columns) if columns else "none"
        raise InputError(f"cannot read '{path}': no id column '{id_column}' (columns: {available})")
    return id_column


def _id_text(value: Any) -> str | None:
    """The id as a string; None when missing.  Integral floats drop ".0" (3.0 -> "3")."""
    if value is None:
        return None
    if isinstance(value, str):
        return value if value else None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (dict, list)):
        return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
    return str(value)


def _json_kind(value: Any) -> str:
    return _JSON_KINDS.get(type(value), "a non-object value")


def _stream_error(exc: BaseException) -> str:
    if isinstance(exc, EOFError):
        return "file is truncated"
    if isinstance(exc, UnicodeDecodeError):
        return "not valid UTF-8"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
