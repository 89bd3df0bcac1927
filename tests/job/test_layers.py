"""The layers' import rules, checked on the source: cli -> job -> engine -> errors, the
job and the CLI reach the engine only through `llamba_cli.engine`'s public names, and
only the engine's FFI module imports `llama_cpp`."""

from __future__ import annotations

import ast
from pathlib import Path

import llamba_cli.engine as engine

PACKAGE = Path(__file__).resolve().parents[2] / "llamba_cli"
FFI = PACKAGE / "engine" / "llama.py"


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in `path`, relative ones made absolute."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{module}" if module else base
            found.append((module, [alias.name for alias in node.names]))
    return found


def modules(layer: str) -> list[Path]:
    return sorted((PACKAGE / layer).glob("*.py"))


def test_job_and_cli_use_only_the_engines_public_names():
    public = set(engine.__all__)
    for layer in ("job", "cli"):
        for path in modules(layer):
            for module, names in imports(path):
                assert not module.startswith("llamba_cli.engine."), (path.name, module)
                if module == "llamba_cli.engine":
                    assert set(names) <= public, (path.name, names)


def test_imports_go_one_way():
    below = {"job": ("llamba_cli.cli",), "engine": ("llamba_cli.cli", "llamba_cli.job")}
    for layer, forbidden in below.items():
        for path in modules(layer):
            for module, _ in imports(path):
                assert not module.startswith(forbidden), (path.name, module)


def test_only_the_ffi_module_imports_llama_cpp():
    for path in PACKAGE.rglob("*.py"):
        if path == FFI:
            continue
        for module, _ in imports(path):
            assert module.split(".")[0] != "llama_cpp", (path, module)
