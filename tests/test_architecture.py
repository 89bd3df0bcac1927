"""The package's shape, checked from its source: which layer may import which, where
llama.cpp is touched, what the engine never does, and the engine's public API."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import llamba_cli.engine as engine_api

PACKAGE = Path(__file__).resolve().parent.parent / "llamba_cli"

# Layers, lowest first: a module imports only from lower layers or its own package.
# `openai` (the protocol layer) and `server` sit above `job`; `cli` and `server` are
# peers at the top (`llamba serve` lives in the CLI).
RANK = {
    "errors": 0,
    "engine": 1,
    "job": 2,
    "openai": 3,
    "server": 4,
    "cli": 4,
    "__main__": 5,
    "__init__": 5,
}

# The engine reads files in exactly these functions, before llama.cpp does (see llama.py).
ENGINE_FILE_READS = {("llama.py", "check_gguf"), ("llama.py", "repack_supported")}


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def layer(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imports(path: Path) -> list[tuple[str, int]]:
    return imports_in(path.read_text(encoding="utf-8"))


def imports_in(source: str) -> list[tuple[str, int]]:
    """(module imported, line) for every import in `source`, lazy ones included."""
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno))
    return found


def test_every_package_has_a_layer():
    unknown = {layer(p) for p in modules()} - RANK.keys()
    assert not unknown, f"give {sorted(unknown)} a layer in RANK"


def test_imports_go_one_way():
    wrong = []
    for path in modules():
        here = layer(path)
        for name, line in imports(path):
            parts = name.split(".")
            if parts[0] != "llamba_cli" or len(parts) < 2:
                continue
            there = parts[1]
            if (
                there != here
                and RANK.get(there, 99) >= RANK[here]
                and {here, there}
                != {
                    "cli",
                    "server",
                }
            ):
                wrong.append(f"{path.relative_to(PACKAGE)}:{line} ({here}) imports {name}")
    assert not wrong, "\n".join(wrong)


def test_only_one_module_imports_llama_cpp():
    users = {
        str(path.relative_to(PACKAGE))
        for path in modules()
        for name, _ in imports(path)
        if name == "llama_cpp" or name.startswith("llama_cpp.")
    }
    assert users == {"engine/llama.py"}


def test_the_engine_does_no_file_io_and_prints_nothing():
    wrong = []
    for path in sorted((PACKAGE / "engine").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for top in tree.body:
            where = getattr(top, "name", "<module>")
            for node in ast.walk(top):
                what = _file_io_or_print(node)
                if what and (path.name, where) not in ENGINE_FILE_READS:
                    wrong.append(f"engine/{path.name}:{node.lineno} {where}: {what}")
    assert not wrong, "\n".join(wrong)


def _file_io_or_print(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name) and node.id == "Path":
        return "Path"
    if isinstance(node, ast.Call):
        f = node.func
        if isinstance(f, ast.Name) and f.id in ("open", "print"):
            return f"{f.id}("
        file_methods = ("open", "read_text", "write_text", "read_bytes", "write_bytes")
        if isinstance(f, ast.Attribute) and f.attr in file_methods:
            return f".{f.attr}("
    return None


def test_the_checks_can_fail():
    """The rules above see what they are meant to see."""
    sample = ast.parse("def f(p):\n    print(open(p).read(), Path(p).read_text())\n")
    found = {_file_io_or_print(n) for n in ast.walk(sample)} - {None}
    assert found == {"print(", "open(", "Path", ".read_text("}
    lazy = "import os\ndef f():\n    from llamba_cli.job import spec\n    import llama_cpp.x\n"
    assert imports_in(lazy) == [("os", 1), ("llamba_cli.job", 3), ("llama_cpp.x", 4)]


# -- the engine's public API (what the job layer, the server and library users rely on) --

PUBLIC = [
    "Engine",
    "EngineConfig",
    "EngineLoop",
    "EngineStats",
    "Grammar",
    "LoopStats",
    "Model",
    "Request",
    "RequestOutput",
    "RequestStream",
    "SamplingParams",
    "Status",
    "TokenLogprob",
    "check_gguf",
    "grammar_vocab_tables",
    "normalize",
    "schema_to_gbnf",
    "use_grammar_vocab_tables",
]


def test_engine_public_names():
    assert sorted(engine_api.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(engine_api, name) is not None


def fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def test_engine_result_types():
    assert fields(engine_api.TokenLogprob) == ["token", "text", "logprob", "top"]
    assert fields(engine_api.RequestOutput) == [
        "request",
        "token_ids",
        "text",
        "logprobs",
        "finished",
    ]
    request = set(fields(engine_api.Request))
    assert {"id", "prompt", "params", "labels", "tag", "deadline", "grammar_text"} <= request
    assert {"text", "finish_reason", "error", "logprobs", "label_logprobs"} <= request
    assert "logprobs" in fields(engine_api.SamplingParams)
    stats = set(fields(engine_api.LoopStats))
    assert {"queue_depth", "waiting", "running"} | set(fields(engine_api.EngineStats)) == stats


def test_engine_methods():
    def params(fn: object) -> list[str]:
        return list(inspect.signature(fn).parameters)  # type: ignore[arg-type]

    eng = engine_api.Engine
    assert params(eng.__init__) == ["self", "config", "model"]
    for name, args in [
        ("submit", ["self", "req"]),
        ("abort", ["self", "req"]),
        ("step", ["self"]),
        ("run", ["self", "requests"]),
        ("close", ["self"]),
    ]:
        assert params(getattr(eng, name)) == args, name
    loop = engine_api.EngineLoop
    assert params(loop.__init__) == ["self", "engine", "max_waiting"]
    for name, args in [
        ("start", ["self"]),
        ("submit", ["self", "req"]),
        ("abort", ["self", "req"]),
        ("stats", ["self"]),
        ("close", ["self", "drain"]),
    ]:
        assert params(getattr(loop, name)) == args, name
    stream = engine_api.RequestStream
    for name in ("__iter__", "__next__", "__aiter__", "__anext__", "result"):
        assert callable(getattr(stream, name)), name
