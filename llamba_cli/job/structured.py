"""Structured output of `generate`: the constraint a job decodes under, and its `json` column.

`--json-schema FILE` turns the schema into a GBNF grammar; `--grammar FILE` gives one
directly.  Either is read, converted and compiled once, before any row runs, so a bad
file stops the job with one line (`ConfigError`).  With a schema, each completed row's
output is parsed into the `json` column: the object itself in JSONL; in Parquet a
typed column derived from the schema (`arrow_type`) when it maps onto Arrow types,
else the JSON text.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from llamba_cli.engine import Grammar, Model, schema_to_gbnf
from llamba_cli.errors import ConfigError
from llamba_cli.job.userfiles import read_text

if TYPE_CHECKING:
    import pyarrow as pa


@dataclass(frozen=True)
class Constraint:
    """The grammar every row of a job is generated under.

    `gbnf` is the grammar text (start symbol `root`); `schema` the parsed JSON Schema
    it came from (None for a GBNF file); `json_type` the Arrow type of the Parquet
    `json` column (None: the column holds JSON text).
    """

    source: str
    gbnf: str
    schema: Any = None

    @functools.cached_property
    def json_type(self) -> pa.DataType | None:
        # Derived on first use, by a Parquet output: a JSON Lines job never loads Arrow.
        return arrow_type(self.schema)  # None for a GBNF file's (no schema)

    @property
    def is_json(self) -> bool:
        return self.schema is not None

    def check(self, model: Model) -> None:
        """Compile the grammar against `model`'s vocabulary once: ConfigError if it fails."""
        try:
            Grammar(model, self.gbnf).close()
        except ConfigError as e:
            raise ConfigError(f"{self.source}: {e}") from None

    def json_value(self, text: str, output_format: str) -> Any:
        """The `json` column's value for a completed row's `text`.

        JSONL gets the parsed value itself; Parquet gets it shaped to `json_type`, or
        as compact JSON text where the schema has no Arrow type.  Raises ValueError
        when `text` is not JSON (which the grammar normally rules out).
        """
        value = orjson.loads(text)
        if output_format != "parquet":
            return value
        if self.json_type is None:
            return orjson.dumps(value).decode()
        return _conform(value, self.json_type)


def load_constraint(json_schema: str | None, grammar: str | None) -> Constraint | None:
    """The job's constraint from a schema file or a GBNF file (at most one is given).

    Raises ConfigError naming the file for an unreadable file, invalid JSON, or a
    schema that cannot be enforced or converted.  The grammar is compiled later, by
    `Constraint.check`, once the model's vocabulary is loaded.
    """
    path = json_schema or grammar
    if path is None:
        return None
    flag = "--json-schema" if json_schema else "--grammar"
    source = f"{flag} {path}"
    text = read_text(path, flag)
    if grammar:
        if not text.strip():
            raise ConfigError(f"{source}: the grammar is empty")
        return Constraint(source=source, gbnf=text)
    try:
        gbnf = schema_to_gbnf(text)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    schema = orjson.loads(text)
    return Constraint(source=source, gbnf=gbnf, schema=schema)


def arrow_type(schema: Any) -> pa.DataType | None:
    """The Arrow type of values valid under `schema`, or None where there is no single one.

    object (with `properties`, no additional ones) -> struct in property order; string
    or an enum of strings -> string; integer -> int64; number -> float64; boolean ->
    bool; array with one `items` schema -> list of the item type.  Anything else
    (oneOf/anyOf/allOf, $ref, additionalProperties, type lists, null, tuples) -> None,
    and so does a schema any of whose parts has no type.
    """
    import pyarrow as pa

    if not isinstance(schema, dict):
        return None
    if {"$ref", "oneOf", "anyOf", "allOf", "const", "prefixItems"} & schema.keys():
        return None
    if "enum" in schema:
        values = schema["enum"]
        ok = isinstance(values, list) and values and all(isinstance(v, str) for v in values)
        return pa.string() if ok else None
    kind = schema.get("type")
    if kind == "string":
        return pa.string()
    if kind == "integer":
        return pa.int64()
    if kind == "number":
        return pa.float64()
    if kind == "boolean":
        return pa.bool_()
    if kind == "array":
        item = arrow_type(schema.get("items"))
        return None if item is None else pa.list_(item)
    if kind in ("object", None) and isinstance(schema.get("properties"), dict):
        if schema.get("additionalProperties") not in (None, False):
            return None
        fields = []
        for name, sub in schema["properties"].items():
            sub_type = arrow_type(sub)
            if sub_type is None:
                return None
            fields.append(pa.field(name, sub_type))
        # Parquet cannot store a struct without fields.
        return pa.struct(fields) if fields else None
    return None


def _conform(value: Any, kind: pa.DataType) -> Any:
    """`value` as Python values that Arrow infers as exactly `kind`: every struct field
    present, in order (absent optional ones null), numbers of a float column as floats."""
    import pyarrow as pa

    if value is None:
        return None
    if pa.types.is_struct(kind):
        return {
            kind.field(i).name: _conform(value.get(kind.field(i).name), kind.field(i).type)
            for i in range(kind.num_fields)
        }
    if pa.types.is_list(kind):
        return [_conform(item, kind.value_type) for item in value]
    if pa.types.is_floating(kind):
        return float(value)
    return value
