"""`llamba generate --json-schema / --grammar`: the `json` column in Parquet and JSONL,
incomplete rows, job files, and one-line exit-2 errors for bad schemas and grammars."""

from __future__ import annotations

import subprocess
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llamba_cli.job.structured import arrow_type
from tests.cli_process import llamba
from tests.schema_check import problems

REPO = Path(__file__).resolve().parents[2]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 16},
                "zip": {"type": "integer", "minimum": 10000, "maximum": 99999},
            },
            "required": ["city", "zip"],
        },
        "score": {"type": "number"},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "address", "score", "active"],
}
STRUCT = pa.struct([
    ("name", pa.string()),
    ("age", pa.int64()),
    ("role", pa.string()),
    ("tags", pa.list_(pa.string())),
    ("address", pa.struct([("city", pa.string()), ("zip", pa.int64())])),
    ("score", pa.float64()),
    ("active", pa.bool_()),
])  # fmt: skip
PROMPTS = [
    "A user record as JSON:\n",
    "Alice is a 34 year old admin from Paris. JSON:",
    "Generate a JSON object for a guest user named Bob.\n",
    "Customer database entry:\n",
    "Employee file (JSON):",
]
ARGS = ["--slots", "5", "--max-tokens", "200", "--temperature", "0.7", "--seed", "3"]


@pytest.fixture
def files(tmp_path: Path) -> Path:
    with (tmp_path / "in.jsonl").open("wb") as f:
        for i, prompt in enumerate(PROMPTS):
            f.write(orjson.dumps({"id": f"r{i}", "prompt": prompt}) + b"\n")
    (tmp_path / "schema.json").write_bytes(orjson.dumps(SCHEMA))
    return tmp_path


def one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("llamba: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_parquet_json_column_is_a_typed_struct(files):
    out = files / "out.parquet"
    result = llamba("generate", str(files / "in.jsonl"), "-o", str(out),
                    "--json-schema", str(files / "schema.json"), *ARGS)  # fmt: skip
    assert result.returncode == 0, result.stderr
    table = pq.read_table(out)
    assert table.schema.field("json").type == STRUCT
    assert table.column_names[:3] == ["id", "text", "json"]
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(len(PROMPTS))]
    for row in rows:
        assert row["error"] is None and row["finish_reason"] == "stop", row
        parsed = orjson.loads(row["text"])  # the raw text stays, and is the same object
        assert problems(parsed, SCHEMA) == [], row["text"]
        assert row["json"] == {**parsed, "score": float(parsed["score"])}


def test_jsonl_json_column_holds_the_object_and_job_files_work(files):
    (files / "job.toml").write_text(
        'task = "generate"\ninput = "in.jsonl"\noutput = "out.jsonl"\n'
        'json_schema = "schema.json"\n[sampling]\nmax_tokens = 200\ntemperature = 0.7\n'
        "[engine]\nslots = 5\n"
    )
    result = llamba("run", str(files / "job.toml"))
    assert result.returncode == 0, result.stderr
    rows = [orjson.loads(line) for line in (files / "out.jsonl").read_bytes().splitlines()]
    assert len(rows) == len(PROMPTS)
    for row in rows:
        assert row["error"] is None, row
        assert isinstance(row["json"], dict)
        assert row["json"] == orjson.loads(row["text"])
        assert problems(row["json"], SCHEMA) == []


def test_too_few_max_tokens_gives_length_errors_not_broken_rows(files):
    out = files / "short.parquet"
    result = llamba("generate", str(files / "in.jsonl"), "-o", str(out),
                    "--json-schema", str(files / "schema.json"), "--slots", "5",
                    "--max-tokens", "6", "--temperature", "0")  # fmt: skip
    assert result.returncode == 1, result.stderr  # rows in error, no --max-errors
    for row in pq.read_table(out).to_pylist():
        assert row["finish_reason"] == "length"
        assert row["error"] == "output did not complete the grammar within max-tokens"
        assert row["text"] is None and row["json"] is None


def test_gbnf_grammar_yes_or_no(files):
    (files / "yn.gbnf").write_text('root ::= "yes" | "no"\n')
    out = files / "yn.jsonl"
    result = llamba("generate", str(files / "in.jsonl"), "-o", str(out), "--grammar",
                    str(files / "yn.gbnf"), "--template", "{prompt} Is this JSON? Answer:",
                    "--slots", "5", "--max-tokens", "8", "--temperature", "1.0")  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert {r["text"] for r in rows} <= {"yes", "no"} and len(rows) == len(PROMPTS)
    assert all("json" not in r for r in rows)  # a grammar is not a schema: text only


@pytest.mark.parametrize(
    ("name", "content", "needles"),
    [
        ("bad.json", '{"type": "object", "properties": ', ["--json-schema", "not valid JSON"]),
        ("uniq.json", '{"type": "array", "items": {"type": "string"}, "uniqueItems": true}',
         ["'uniqueItems'", "not supported"]),
        ("num.json", '{"type": "object", "properties": {"x": {"type": "number", "maximum": 1}}}',
         ["integers only", "/properties/x"]),
        ("conv.json", '{"type": "wat"}', ["cannot convert the schema"]),
    ],
)  # fmt: skip
def test_bad_schema_stops_with_exit_2_and_one_line(files, name, content, needles):
    (files / name).write_text(content)
    result = llamba("generate", str(files / "in.jsonl"), "-o", str(files / "o.parquet"),
                    "--json-schema", str(files / name))  # fmt: skip
    one_line_error(result, name, *needles)
    assert not (files / "o.parquet").exists()


def test_bad_grammar_and_missing_file_stop_with_exit_2_and_one_line(files):
    (files / "bad.gbnf").write_text('root ::= "yes" | maybe\n')
    result = llamba("generate", str(files / "in.jsonl"), "-o", str(files / "o.jsonl"),
                    "--grammar", str(files / "bad.gbnf"))  # fmt: skip
    one_line_error(result, "bad.gbnf", "invalid grammar", "Undefined rule identifier 'maybe'")
    result = llamba("generate", str(files / "in.jsonl"), "-o", str(files / "o.jsonl"),
                    "--json-schema", str(files / "nope.json"))  # fmt: skip
    one_line_error(result, "cannot read --json-schema", "nope.json")


def test_arrow_type_from_schema():
    assert arrow_type(SCHEMA) == STRUCT
    assert arrow_type({"type": "array", "items": {"enum": ["a", "b"]}}) == pa.list_(pa.string())
    untyped = [
        {"oneOf": [{"type": "string"}, {"type": "integer"}]},
        {"anyOf": [{"type": "string"}]},
        {"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": True},
        {"type": "object", "additionalProperties": {"type": "integer"}},
        {"type": "object", "properties": {"a": {"type": ["string", "null"]}}},
        {"type": "object", "properties": {}},
        {"enum": ["a", 1]},
        {"type": "array", "prefixItems": [{"type": "string"}]},
        {},
    ]
    for schema in untyped:
        assert arrow_type(schema) is None, schema


def test_untyped_schema_stores_json_text_in_parquet(files):
    schema = {"type": "object", "properties": {"v": {"anyOf": [{"type": "boolean"},
                                                              {"enum": ["maybe"]}]}},
              "required": ["v"]}  # fmt: skip
    (files / "any.json").write_bytes(orjson.dumps(schema))
    out = files / "any.parquet"
    result = llamba("generate", str(files / "in.jsonl"), "-o", str(out), "--limit", "2",
                    "--json-schema", str(files / "any.json"), "--slots", "2",
                    "--max-tokens", "40", "--temperature", "0")  # fmt: skip
    assert result.returncode == 0, result.stderr
    table = pq.read_table(out)
    assert table.schema.field("json").type == pa.string()
    for row in table.to_pylist():
        assert orjson.loads(row["json"])["v"] in (True, False, "maybe")
