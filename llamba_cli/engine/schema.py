"""What constrained decoding can promise for a JSON Schema, checked before any row runs.

The schema is turned into a GBNF grammar by llama-cpp-python's converter (see
`grammar.schema_to_gbnf`).  That converter skips keywords it does not know, so a schema
using one would let rows through that violate it without a word.  `check_schema`
refuses such schemas with one line naming the keyword and where it sits, so every
row that completes really conforms.  Integer bounds (`minimum`, `maximum`,
`exclusiveMinimum`, `exclusiveMaximum`), which the converter also skips, are enforced
here instead: `integer_range_rule` writes the GBNF for them.

Pure Python: nothing here touches llama.cpp.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import orjson

from llamba_cli.errors import ConfigError

# Keywords the converter ignores, which would make its grammar looser than the schema.
_UNSUPPORTED = frozenset(
    {
        "not",
        "if",
        "then",
        "else",
        "multipleOf",
        "uniqueItems",
        "contains",
        "minContains",
        "maxContains",
        "additionalItems",
        "unevaluatedItems",
        "unevaluatedProperties",
        "minProperties",
        "maxProperties",
        "patternProperties",
        "propertyNames",
        "dependencies",
        "dependentRequired",
        "dependentSchemas",
    }
)
INTEGER_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_FORMATS = frozenset({"date", "time", "date-time", "uuid", *(f"uuid{i}" for i in range(1, 6))})
# With `"type": [...]` the converter keeps nothing but the types themselves.
_ANNOTATIONS = frozenset(
    {"type", "title", "description", "default", "examples", "$comment", "deprecated"}
)
# The converter's own integer rule allows at most 16 digits; open bounds stay within it.
MAX_INTEGER_DIGITS = 16


def parse_schema(text: str) -> Any:
    """The schema in `text` as Python values; ConfigError unless it is a checkable
    JSON Schema (a JSON object, or `true`) that constrained decoding fully enforces."""
    try:
        schema = orjson.loads(text)
    except orjson.JSONDecodeError as e:
        raise ConfigError(f"not valid JSON: {e}") from None
    if schema is True:
        return {}
    if not isinstance(schema, dict):
        raise ConfigError(f"a JSON Schema must be a JSON object, got {type(schema).__name__}")
    check_schema(schema)
    return schema


def check_schema(schema: dict[str, Any]) -> None:
    """ConfigError for the first (sub)schema using something the grammar would not enforce."""
    for path, sub in _subschemas(schema, ""):
        where = f" (at {path})" if path else ""
        for key in sub:
            if key in _UNSUPPORTED:
                raise ConfigError(
                    f"the keyword {key!r}{where} is not supported by constrained decoding"
                )
        types = sub.get("type")
        if isinstance(types, list):
            extra = sorted(set(sub) - _ANNOTATIONS)
            if extra:
                raise ConfigError(
                    f"'type' as a list cannot be combined with {extra[0]!r}{where}; "
                    "use anyOf with one schema per type"
                )
        fmt = sub.get("format")
        if fmt is not None and fmt not in _FORMATS:
            raise ConfigError(
                f"the format {fmt!r}{where} is not supported by constrained decoding "
                f"(supported: {', '.join(sorted(_FORMATS))}); use a 'pattern' instead"
            )
        if any(k in sub for k in INTEGER_BOUNDS):
            if types != "integer":
                raise ConfigError(f"minimum/maximum{where} are supported for integers only")
            integer_bounds(sub, where)
        # The converter writes only listed properties, so a required one must be listed.
        props = sub.get("properties")
        if isinstance(props, dict) or "required" in sub:
            missing = [name for name in sub.get("required", ()) if name not in (props or {})]
            if missing:
                raise ConfigError(f"required property {missing[0]!r}{where} is not in 'properties'")


def _subschemas(schema: Any, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema object inside `schema` (itself first), with a JSON-pointer-ish path."""
    if not isinstance(schema, dict):
        return
    yield path, schema
    for key in ("properties", "$defs", "definitions"):
        children = schema.get(key)
        if isinstance(children, dict):
            for name, child in children.items():
                yield from _subschemas(child, f"{path}/{key}/{name}")
    for key in ("items", "additionalProperties"):
        yield from _subschemas(schema.get(key), f"{path}/{key}")
    for key in ("prefixItems", "anyOf", "oneOf", "allOf"):
        children = schema.get(key)
        if isinstance(children, list):
            for i, child in enumerate(children):
                yield from _subschemas(child, f"{path}/{key}/{i}")
    items = schema.get("items")
    if isinstance(items, list):  # draft 4 tuple form
        for i, child in enumerate(items):
            yield from _subschemas(child, f"{path}/items/{i}")


def integer_bounds(schema: dict[str, Any], where: str = "") -> tuple[int | None, int | None]:
    """Inclusive (low, high) of an integer schema; None where open.  Accepts the numeric
    exclusive bounds of draft 6+ and the boolean ones of draft 4."""
    lo: int | None = None
    hi: int | None = None
    ex_lo, ex_hi = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    for key in INTEGER_BOUNDS:
        value = schema.get(key)
        if value is None or isinstance(value, bool):
            continue
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(f"{key}{where} must be a number, got {value!r}")
    if (m := schema.get("minimum")) is not None:
        lo = math.floor(m) + 1 if ex_lo is True else math.ceil(m)
    if (m := schema.get("maximum")) is not None:
        hi = math.ceil(m) - 1 if ex_hi is True else math.floor(m)
    if ex_lo is not None and not isinstance(ex_lo, bool):
        lo = max(lo, math.floor(ex_lo) + 1) if lo is not None else math.floor(ex_lo) + 1
    if ex_hi is not None and not isinstance(ex_hi, bool):
        hi = min(hi, math.ceil(ex_hi) - 1) if hi is not None else math.ceil(ex_hi) - 1
    if lo is not None and hi is not None and lo > hi:
        raise ConfigError(f"no integer lies within the bounds{where}")
    cap = 10**MAX_INTEGER_DIGITS - 1
    for bound in (lo, hi):
        if bound is not None and abs(bound) > cap:
            raise ConfigError(
                f"integer bounds{where} must have at most {MAX_INTEGER_DIGITS} digits"
            )
    return lo, hi


def integer_range_rule(lo: int | None, hi: int | None) -> str:
    """A GBNF expression matching exactly the JSON integers in [lo, hi] (None = open,
    up to `MAX_INTEGER_DIGITS` digits), written without leading zeros."""
    cap = 10**MAX_INTEGER_DIGITS - 1
    lo = -cap if lo is None else lo
    hi = cap if hi is None else hi
    alternatives = []
    if lo < 0:
        alternatives.append(f'"-" ({_natural_range(max(1, -hi), -lo)})')
    if hi >= 0:
        alternatives.append(_natural_range(max(0, lo), hi))
    return "(" + " | ".join(alternatives) + ")"


def _natural_range(a: int, b: int) -> str:
    """Decimal numbers a..b (0 <= a <= b), split by digit count."""
    parts = []
    for digits in range(len(str(a)), len(str(b)) + 1):
        first = max(a, 10 ** (digits - 1) if digits > 1 else 0)
        last = min(b, 10**digits - 1)
        parts.append(_same_length(str(first), str(last)))
    return " | ".join(parts)


def _same_length(x: str, y: str) -> str:
    """Digit strings of len(x) between x and y inclusive (len(x) == len(y), x <= y)."""
    if x == y:
        return f'"{x}"'
    if len(x) == 1:
        return f"[{x}-{y}]"
    rest = len(x) - 1
    any_rest = " ".join(["[0-9]"] * rest)
    if x[0] == y[0]:
        return f'"{x[0]}" ({_same_length(x[1:], y[1:])})'
    parts = []
    low_full = x[1:] == "0" * rest  # every continuation of x's first digit is in range
    high_full = y[1:] == "9" * rest
    if not low_full:
        parts.append(f'"{x[0]}" ({_same_length(x[1:], "9" * rest)})')
    start = int(x[0]) + (0 if low_full else 1)
    end = int(y[0]) - (0 if high_full else 1)
    if start <= end:
        head = f'"{start}"' if start == end else f"[{start}-{end}]"
        parts.append(f"{head} {any_rest}")
    if not high_full:
        parts.append(f'"{y[0]}" ({_same_length("0" * rest, y[1:])})')
    return " | ".join(parts)
