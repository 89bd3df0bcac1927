"""The columns of a job's output, and the Parquet tables they are written as.

`output_schema` fixes a job's Parquet schema from the job alone (task, labels, n,
the JSON Schema's type, logprobs, the kept input columns), never from the rows: an
output with no error rows still has a string `error` column, an output of zero rows
has every column, and so the outputs of `--shard` runs read together
(`pq.read_table(folder)`).

Stores opened without a schema (library use) infer each part's schema from its own
rows, and the merge unifies the parts' schemas permissively.  Either way a value
Arrow cannot put in its column's type is stored as text (non-strings as JSON) rather
than failing the job.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from llamba_cli.errors import OutputError
from llamba_cli.job.writer import kept_name

_MERGE_BATCH = 65_536
_ROW_GROUP_ROWS = 131_072  # merged output is regrouped: parts are small, readers like big groups
_JSON_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY

LOGPROB_TYPE = pa.list_(
    pa.struct(
        [
            ("token", pa.string()),
            ("logprob", pa.float64()),
            ("top", pa.list_(pa.struct([("token", pa.string()), ("logprob", pa.float64())]))),
        ]
    )
)


def output_schema(
    *,
    task: str,
    labels: Sequence[str] | None = None,
    samples: bool = False,
    json_type: pa.DataType | None = None,
    with_json: bool = False,
    logprobs: bool = False,
    kept: Sequence[tuple[str, pa.DataType]] = (),
) -> pa.Schema:
    """The Parquet schema of a job's output.

    generate: id, (sample), text, (json), finish_reason, prompt_tokens,
    completion_tokens, (logprobs), error.  classify: id, label, confidence, p_<label>
    and logprob_<label> per label, prompt_tokens, error.  Then the `kept` input
    columns, renamed by `kept_name` where they collide.  `json_type` None with
    `with_json` stores the JSON as text.
    """
    fields: list[tuple[str, pa.DataType]] = [("id", pa.string())]
    if task == "classify":
        fields += [("label", pa.string()), ("confidence", pa.float64())]
        fields += [(f"p_{label}", pa.float64()) for label in labels or ()]
        fields += [(f"logprob_{label}", pa.float64()) for label in labels or ()]
        fields += [("prompt_tokens", pa.int64())]
    else:
        if samples:
            fields.append(("sample", pa.int64()))
        fields.append(("text", pa.string()))
        if with_json:
            fields.append(("json", json_type or pa.string()))
        fields += [
            ("finish_reason", pa.string()),
            ("prompt_tokens", pa.int64()),
            ("completion_tokens", pa.int64()),
        ]
        if logprobs:
            fields.append(("logprobs", LOGPROB_TYPE))
    fields.append(("error", pa.string()))
    names = [name for name, _ in fields]
    for column, kind in kept:
        name = kept_name(column, names)
        names.append(name)
        fields.append((name, kind))
    return pa.schema(fields)


def rows_to_table(rows: list[dict[str, Any]], schema: pa.Schema | None = None) -> pa.Table:
    """The rows as a table: of `schema` when given (missing keys null), else inferred."""
    if schema is None:
        names: dict[str, None] = {}  # union of the rows' keys, in first-seen order
        for row in rows:
            names.update(dict.fromkeys(row))
        columns = [_inferred_array([row.get(name) for row in rows]) for name in names]
        return pa.Table.from_arrays(columns, names=list(names))
    arrays = [_typed_array([row.get(f.name) for row in rows], f) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def _typed_array(values: list[Any], field: pa.Field) -> pa.Array:
    try:
        return pa.array(values, type=field.type)
    except (pa.ArrowException, OverflowError, TypeError, ValueError) as exc:
        if pa.types.is_string(field.type):
            return pa.array([_text(value) for value in values], pa.string())
        raise OutputError(
            f"a value of column {field.name!r} does not fit its type {field.type}: "
            f"{_first_line(exc)}"
        ) from None


def plain_type(kind: pa.DataType) -> bool:
    """Whether values of type `kind` survive the trip through Python values unchanged
    (a kept input column of any other type, such as timestamps, decimals or maps, is
    written as text)."""
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return plain_type(kind.value_type)
    if pa.types.is_struct(kind):
        return kind.num_fields > 0 and all(
            plain_type(kind.field(i).type) for i in range(kind.num_fields)
        )
    return (
        pa.types.is_boolean(kind)
        or pa.types.is_integer(kind)
        or pa.types.is_floating(kind)
        or pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
    )


def fits(value: Any, kind: pa.DataType) -> bool:
    """Whether `value` can be stored in a column of type `kind`."""
    try:
        pa.array([value], type=kind)
    except (pa.ArrowException, OverflowError, TypeError, ValueError):
        return False
    return True


def _inferred_array(values: list[Any]) -> pa.Array:
    try:
        array = pa.array(values)
    except (pa.ArrowException, OverflowError, TypeError, ValueError):
        return pa.array([_text(value) for value in values], pa.string())
    if not _parquet_writable(array.type):
        return pa.array([_text(value) for value in values], pa.string())
    return array


def _parquet_writable(kind: pa.DataType) -> bool:
    """False for types Parquet cannot store, i.e. a struct without fields (from `{}`)."""
    if pa.types.is_struct(kind):
        fields = [kind.field(i) for i in range(kind.num_fields)]
        return bool(fields) and all(_parquet_writable(field.type) for field in fields)
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return _parquet_writable(kind.value_type)
    if pa.types.is_map(kind):
        return _parquet_writable(kind.key_type) and _parquet_writable(kind.item_type)
    return True


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return orjson.dumps(value, default=str, option=_JSON_OPTIONS).decode()


def merge_parquet_parts(
    parts: list[Path],
    dest: Path,
    *,
    metadata: dict[bytes, bytes],
    keep: np.ndarray | None,
    schema: pa.Schema | None = None,
) -> None:
    """Stream the parts into one Parquet file at `dest`, one batch in memory at a time.

    The file has `schema` when given, else the parts' unified schema.  With `keep`, a
    mask over all rows of all parts in order, only the marked rows are written.
    """
    if schema is None:
        target, as_text = _unified_schema([pq.read_schema(part) for part in parts])
    else:
        target, as_text = schema, set()
    target = target.with_metadata(metadata)
    position = 0
    pending: list[pa.Table] = []
    pending_rows = 0
    with pq.ParquetWriter(dest, target) as writer:
        for part in parts:
            with pq.ParquetFile(part) as parquet:
                for batch in parquet.iter_batches(batch_size=_MERGE_BATCH):
                    table = _conform(pa.Table.from_batches([batch]), target, as_text)
                    if keep is not None:
                        table = table.filter(pa.array(keep[position : position + len(table)]))
                    position += batch.num_rows
                    pending.append(table)
                    pending_rows += len(table)
                    if pending_rows >= _ROW_GROUP_ROWS:
                        writer.write_table(pa.concat_tables(pending))
                        pending, pending_rows = [], 0
        if pending:
            writer.write_table(pa.concat_tables(pending))
    if keep is not None and position != len(keep):
        raise OutputError(f"cannot merge the parts in '{dest.parent}': they changed during the job")


def _unified_schema(schemas: list[pa.Schema]) -> tuple[pa.Schema, set[str]]:
    """One schema for all parts, and the names of columns that must be stored as text."""
    candidates: dict[str, list[pa.Field]] = {}
    for schema in schemas:
        for field in schema:
            candidates.setdefault(field.name, []).append(field)
    if not candidates:
        return pa.schema([("id", pa.string()), ("error", pa.string())]), set()
    fields: list[pa.Field] = []
    as_text: set[str] = set()
    for name, versions in candidates.items():
        try:
            single = [pa.schema([field]) for field in versions]
            fields.append(pa.unify_schemas(single, promote_options="permissive").field(0))
        except pa.ArrowException:
            fields.append(pa.field(name, pa.string()))
            as_text.add(name)
    return pa.schema(fields), as_text


def _conform(table: pa.Table, target: pa.Schema, as_text: set[str]) -> pa.Table:
    """`table` with exactly the columns and types of `target` (missing ones all null)."""
    columns: list[pa.Array | pa.ChunkedArray] = []
    for field in target:
        if field.name not in table.column_names:
            columns.append(pa.nulls(len(table), field.type))
            continue
        column = table.column(field.name)
        if field.name in as_text:
            if not pa.types.is_string(column.type):
                column = pa.array([_text(value) for value in column.to_pylist()], pa.string())
        elif column.type != field.type:
            try:
                column = column.cast(field.type)
            except pa.ArrowException:
                # e.g. structs whose fields differ: rebuild from values, missing ones null
                column = _typed_array(column.to_pylist(), field)
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=target)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
