"""A small JSON Schema validator for the subset the structured-output tests use.

Supports: type (object, array, string, integer, number, boolean), properties,
required, additionalProperties (absent or false: no other keys, as the grammar
writes them), enum, minimum/maximum (and the exclusive forms), minLength/maxLength,
items, minItems/maxItems.  Anything else in a schema fails loudly, so a test cannot
pass by accident on a keyword this checker ignores.
"""

from __future__ import annotations

from typing import Any

_KNOWN = {
    "type", "properties", "required", "additionalProperties", "enum", "minimum",
    "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength",
    "items", "minItems", "maxItems", "title", "description",
}  # fmt: skip


def problems(value: Any, schema: dict[str, Any], path: str = "$") -> list[str]:
    """Every way `value` violates `schema` (empty when it conforms)."""
    unknown = set(schema) - _KNOWN
    if unknown:
        raise ValueError(f"schema_check does not know {sorted(unknown)} at {path}")
    out: list[str] = []
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{path}: {value!r} not in {schema['enum']}")
    kind = schema.get("type")
    checks = {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
    }
    if kind is not None and not checks[kind](value):
        return [*out, f"{path}: {value!r} is not of type {kind}"]
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            out.append(f"{path}: {value} < minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            out.append(f"{path}: {value} > maximum {schema['maximum']}")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            out.append(f"{path}: {value} <= exclusiveMinimum {schema['exclusiveMinimum']}")
        if "exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"]:
            out.append(f"{path}: {value} >= exclusiveMaximum {schema['exclusiveMaximum']}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            out.append(f"{path}: shorter than minLength")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            out.append(f"{path}: {value!r} longer than maxLength {schema['maxLength']}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            out.append(f"{path}: fewer than minItems")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            out.append(f"{path}: more than maxItems {schema['maxItems']}")
        for i, item in enumerate(value):
            out += problems(item, schema.get("items", {}), f"{path}[{i}]")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                out.append(f"{path}: missing required {name!r}")
        for name, item in value.items():
            if name in props:
                out += problems(item, props[name], f"{path}.{name}")
            elif schema.get("additionalProperties", False) is False:
                out.append(f"{path}: unexpected property {name!r}")
    return out
