"""A per-model file cache of the vocabulary tables grammar sampling needs.

Building them is one pass over the vocabulary through llama.cpp (about a second for
the embedded model's 262,144 tokens), paid by every `--json-schema` or `--grammar`
run or server; stored, a one-row structured job starts in a fraction of that.  A job
reads the file while its model loads and checks it after (`read_grammar_vocab`, then
`prime_grammar_vocab`); a server adopts it before it reports ready, or builds and
stores the tables in the background once ready (`adopt_grammar_vocab`,
`build_grammar_vocab`).

Safe when the cache is missing, stale or unwritable: a file is named by the model's
identity (size and a hash of its head and tail, as in the output fingerprint), the
llama-cpp-python version and this format's version, so another model or library
never finds it; it is written to a temporary name and renamed, so a reader never
sees half a file; a file that cannot be read or parsed is ignored; and whatever is
read is checked by the engine against llama.cpp before it is used
(`use_grammar_vocab_tables`), else rebuilt and written again.  Failing to write is
not an error: the next run builds the tables again.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llamba_cli.engine import Model, grammar_vocab_tables, use_grammar_vocab_tables
from llamba_cli.job.models import model_identity

FORMAT = 1
# Bigger files are not ours (four arrays of at most a few MiB for any real vocabulary).
_MAX_BYTES = 64 << 20


def cache_dir() -> Path:
    """`$LLAMBA_CACHE_DIR`, else `$XDG_CACHE_HOME/llamba`, else `~/.cache/llamba`."""
    chosen = os.environ.get("LLAMBA_CACHE_DIR")
    if chosen:
        return Path(chosen).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llamba"


def cache_path(model_path: Path) -> Path:
    import importlib.metadata  # 9 ms: only structured jobs keep tables here

    ident = model_identity(model_path)
    try:
        lib = importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a dependency
        lib = "unknown"
    name = f"grammar-vocab-v{FORMAT}-{ident['size']}-{ident['sha256_head_tail']}-{lib}.npz"
    return cache_dir() / name


@dataclass(frozen=True)
class StoredVocab:
    """What the cache holds for one model file: read before the model is loaded (it
    needs only the file), checked against the model after."""

    path: Path
    tables: dict[str, Any] | None  # None: missing, unreadable or not ours


def read_grammar_vocab(model_path: Path) -> StoredVocab:
    """What the cache holds for the model file at `model_path` (no model needed)."""
    path = cache_path(model_path)
    return StoredVocab(path, _read(path))


def prime_grammar_vocab(model: Model, model_path: Path, stored: StoredVocab | None = None) -> str:
    """Make `model`'s grammar vocabulary tables ready, from the cache when a valid
    copy is there (`stored`: read earlier by `read_grammar_vocab`, while the model
    loaded).  Returns what happened: "cached", "built" or "built, not stored"."""
    if stored is None:
        stored = read_grammar_vocab(model_path)
    return "cached" if adopt_grammar_vocab(model, stored) else build_grammar_vocab(model, stored)


def adopt_grammar_vocab(model: Model, stored: StoredVocab) -> bool:
    """Use the stored tables for `model` if there are any and they check out."""
    return stored.tables is not None and use_grammar_vocab_tables(model, stored.tables)


def build_grammar_vocab(model: Model, stored: StoredVocab) -> str:
    """Build `model`'s tables (one pass over its vocabulary) and store them where
    `stored` was looked for.  Returns "built" or "built, not stored"."""
    fresh = grammar_vocab_tables(model)
    return "built" if _write(stored.path, fresh) else "built, not stored"


def _read(path: Path) -> dict[str, Any] | None:
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_BYTES + 1)
        if len(data) > _MAX_BYTES:
            return None
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except Exception:  # missing, unreadable, truncated or not ours: build instead
        return None


def _write(path: Path, tables: dict[str, np.ndarray]) -> bool:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("wb") as f:
            np.savez(f, **tables)  # type: ignore[arg-type]  # numpy types **kwds as bool
        os.replace(tmp, path)
        return True
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
