"""Streaming readers for the input files of a job: JSON Lines, Parquet and CSV.

`open_input` checks everything that can be checked up front (the file exists and is
readable, its format is known, the header or schema is intact, the id column exists)
and raises `InputError` with one line naming the path, so a job never starts on an
input it cannot read.  Iterating an `InputSource` then streams `InputRow`s in file
order with memory bounded by one batch (one line for JSON Lines), whatever the file
size.  A row that cannot be read does not stop the job: it comes out as an
`InputRow` with `data=None` and `error` set, and the job writes it as an error row.

Ids are strings.  The id of a row is the value of the id column (`id` by default,
when the input has one), otherwise its 0-based index in the file.  Because resuming
matches rows by id, an input without ids can only be resumed if it is unchanged.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

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


@dataclass(frozen=True)
class InputRow:
    """One row of the input, in file order.

    `index` is the 0-based position among the file's rows (blank JSON lines do not
    count).  `data` holds the row's columns as JSON-like Python values, or None when
    the row could not be parsed; `error` says why the row cannot be used, or is None.
    A row with a missing id keeps its `data` but has `error` set.
    """

    index: int
    id: str
    data: dict[str, Any] | None
    error: str | None


class InputSource:
    """A readable input file; iterate it to stream its rows (again from the start each time).

    `columns` lists the column names: from the schema or header for Parquet and CSV,
    from the first parseable object for JSON Lines.  `id_column` is the column the
    ids come from, or None when rows are identified by their index.
    """

    format: InputFormat

    def __init__(self, path: Path, *, id_column: str | None, batch_rows: int) -> None:
        self.path = path
        self.batch_rows = batch_rows
        self.columns: list[str] = self._read_columns()
        self.id_column: str | None = _resolve_id_column(path, self.columns, id_column)

    def count_rows(self) -> int | None:
        """The number of rows, if it can be known without parsing the file; else None."""
        return None

    def __iter__(self) -> Iterator[InputRow]:
        raise NotImplementedError

    def _read_columns(self) -> list[str]:
        raise NotImplementedError

    def _row(self, index: int, data: dict[str, Any]) -> InputRow:
        if self.id_column is None:
            return InputRow(index, str(index), data, None)
        row_id = _id_text(data.get(self.id_column))
        if row_id is None:
            return InputRow(index, str(index), data, f"missing id column '{self.id_column}'")
        return InputRow(index, row_id, data, None)

    def _fail(self, reason: str) -> InputError:
        return InputError(f"cannot read '{self.path}': {reason}")


def open_input(
    path: str | Path, *, id_column: str | None = None, batch_rows: int = 1024
) -> InputSource:
    """Open an input file for streaming, checking it is readable before any work starts.

    The format comes from the extension: .jsonl/.ndjson/.json (JSON Lines, also
    gzipped as .gz), .parquet/.pq, .csv (also .csv.gz).  With `id_column=None` the
    column `id` is used when present, else each row's index.  Raises `InputError` for
    an unknown extension, a missing, unreadable or empty file, a corrupt Parquet file,
    or an `id_column` the file does not have.
    """
    path = Path(path)
    fmt, gzipped = _detect_format(path)
    if not path.exists():
        raise InputError(f"cannot read '{path}': no such file")
    if path.is_dir():
        raise InputError(f"cannot read '{path}': is a directory")
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
    return CsvSource(path, id_column=id_column, batch_rows=batch_rows)


class JsonlSource(InputSource):
    """JSON Lines: one JSON object per line; blank lines are skipped.

    A line that is not valid JSON, or not an object, becomes an error row and the
    stream goes on.  Values keep their JSON types (lists and objects stay lists and
    dicts).
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

    def _read_columns(self) -> list[str]:
        sniffed = 0
        try:
            with self._open() as stream:
                for raw in stream:
                    if not raw.strip():
                        continue
                    sniffed += 1
                    try:
                        value = orjson.loads(raw)
                    except orjson.JSONDecodeError:
                        value = None
                    if isinstance(value, dict):
                        return list(value)
                    if sniffed >= _JSONL_SNIFF_LINES:
                        break
        except _STREAM_ERRORS as exc:
            raise self._fail(_stream_error(exc)) from None
        if sniffed == 0:
            raise self._fail("file is empty (no JSON lines)")
        return []

    def count_rows(self) -> int | None:
        """Count non-blank lines, reading binary blocks so memory stays constant."""
        count = 0
        pending = False  # the line not yet ended by a newline has non-blank content
        try:
            with self._open() as stream:
                while block := stream.read(_COUNT_BLOCK_BYTES):
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
                for line_number, raw in enumerate(stream, start=1):
                    if not raw.strip():
                        continue
                    yield self._parse_line(index, line_number, raw)
                    index += 1
        except _STREAM_ERRORS as exc:
            raise self._fail(_stream_error(exc)) from None

    def _parse_line(self, index: int, line_number: int, raw: bytes) -> InputRow:
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            # orjson counts lines within this one line; only the column is meaningful.
            reason = f"line {line_number}: invalid JSON: {exc.msg} at column {exc.colno}"
            return InputRow(index, str(index), None, reason)
        if not isinstance(value, dict):
            reason = f"line {line_number}: expected a JSON object, got {_json_kind(value)}"
            return InputRow(index, str(index), None, reason)
        return self._row(index, value)


class ParquetSource(InputSource):
    """Parquet, streamed one record batch of `batch_rows` rows at a time."""

    format: InputFormat = "parquet"

    def _read_columns(self) -> list[str]:
        try:
            with pq.ParquetFile(self.path) as parquet:
                self._num_rows: int = parquet.metadata.num_rows
                return list(parquet.schema_arrow.names)
        except (pa.ArrowException, OSError) as exc:
            raise self._fail(f"not a valid Parquet file ({_first_line(exc)})") from None

    def count_rows(self) -> int | None:
        """The row count from the Parquet footer (read at open; no data is read)."""
        return self._num_rows

    def __iter__(self) -> Iterator[InputRow]:
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
    """CSV with a header line, streamed block by block.

    Every value is read as a string, exactly as written (an empty cell is ""): CSV has
    no types, and inferring them from the first block would fail mid-file when a later
    block disagrees, and would turn an id like "007" into 7.  Quoted values may span
    lines.  A malformed line (wrong number of cells, invalid UTF-8) stops the stream
    with `InputError` naming the file, since its rows cannot be told apart reliably.
    """

    format: InputFormat = "csv"

    _PARSE = pacsv.ParseOptions(newlines_in_values=True)

    def _read_columns(self) -> list[str]:
        try:
            with self._reader(column_types=None) as reader:
                return list(reader.schema.names)
        except (pa.ArrowException, OSError, EOFError) as exc:
            message = _first_line(exc)
            if "Empty CSV file" in message:
                raise self._fail("file is empty (no header line)") from None
            raise self._fail(f"not a valid CSV file ({message})") from None

    @contextlib.contextmanager
    def _reader(
        self, column_types: dict[str, pa.DataType] | None
    ) -> Iterator[pacsv.CSVStreamingReader]:
        convert = pacsv.ConvertOptions(
            column_types=column_types or {},
            strings_can_be_null=False,
            null_values=[],
            quoted_strings_can_be_null=False,
        )
        read = pacsv.ReadOptions(use_threads=False)
        # "detect" decompresses by extension, so .csv.gz is streamed like .csv.
        with pa.input_stream(str(self.path), compression="detect") as stream:
            reader = pacsv.open_csv(
                stream, read_options=read, parse_options=self._PARSE, convert_options=convert
            )
            with reader:  # both closed here, not left to the garbage collector
                yield reader

    def __iter__(self) -> Iterator[InputRow]:
        index = 0
        as_text = {name: pa.string() for name in self.columns}
        try:
            with self._reader(column_types=as_text) as reader:
                for batch in reader:
                    for data in batch.to_pylist():
                        yield self._row(index, data)
                        index += 1
        except (pa.ArrowException, OSError, EOFError) as exc:
            raise self._fail(f"malformed CSV after row {index} ({_first_line(exc)})") from None


def _detect_format(path: Path) -> tuple[InputFormat, bool]:
    name = path.name.lower()
    for suffix, fmt, gzipped in _SUFFIXES:
        if name.endswith(suffix):
            return fmt, gzipped
    raise InputError(f"cannot read '{path}': unknown input format (use .jsonl, .parquet or .csv)")


def _resolve_id_column(path: Path, columns: list[str], id_column: str | None) -> str | None:
    if id_column is None:
        return "id" if "id" in columns else None
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
        return orjson.dumps(value).decode()
    return str(value)


def _json_kind(value: Any) -> str:
    return _JSON_KINDS.get(type(value), "a non-object value")


def _stream_error(exc: BaseException) -> str:
    if isinstance(exc, EOFError):
        return "file is truncated"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
