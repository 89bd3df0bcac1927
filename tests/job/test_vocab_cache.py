"""The grammar vocabulary cache: used when valid, rebuilt when missing, stale,
corrupt or tampered with, and never a reason to fail when it cannot be written."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from llamba_cli.engine import Grammar, Model
from llamba_cli.engine.grammar import grammar_vocab_tables, use_grammar_vocab_tables
from llamba_cli.job.vocab_cache import (
    adopt_grammar_vocab,
    build_grammar_vocab,
    cache_path,
    prime_grammar_vocab,
    read_grammar_vocab,
)

GBNF = 'root ::= "{" [a-z]+ "}"'


@pytest.fixture
def fresh_model(model_path: Path) -> Iterator[Model]:
    """A model of its own: grammar tables are kept per loaded model."""
    m = Model(model_path)
    yield m
    m.close()


def test_built_then_cached_and_equal(tmp_path, monkeypatch, model_path, fresh_model, model):
    monkeypatch.setenv("LLAMBA_CACHE_DIR", str(tmp_path / "cache"))
    path = cache_path(model_path)
    assert not path.exists()
    assert prime_grammar_vocab(model, model_path) == "built"
    assert path.is_file()
    # a second process (a fresh model) takes the stored tables, and they are the same
    assert prime_grammar_vocab(fresh_model, model_path) == "cached"
    built, cached = grammar_vocab_tables(model), grammar_vocab_tables(fresh_model)
    assert built.keys() == cached.keys()
    for name in built:
        assert np.array_equal(built[name], cached[name]), name
    g = Grammar(fresh_model, GBNF)
    allowed = g.candidates()
    assert allowed is not None and len(allowed) > 0
    g.close()


def test_bad_tables_are_refused(tmp_path, monkeypatch, model_path, model, fresh_model):
    good = {k: v.copy() for k, v in grammar_vocab_tables(model).items()}
    assert good["eog"][model.eos]

    def changed(name: str, edit) -> dict:  # type: ignore[no-untyped-def]
        t = {k: v.copy() for k, v in good.items()}
        t[name] = edit(t[name])
        return t

    def flip(a: np.ndarray, i: int) -> np.ndarray:
        a[i] = ~a[i] if a.dtype == np.bool_ else a[i] + 1
        return a

    probe = int(np.flatnonzero(good["single"] & ~good["control"])[0])
    bad = [
        changed("eog", lambda a: flip(a, model.eos)),  # the end token not marked
        changed("eog", lambda a: flip(a, probe)),  # an ordinary token marked as end
        changed("first", lambda a: flip(a, probe)),  # a probe's byte wrong
        changed("first", lambda a: a.astype(np.int32)),  # wrong type
        changed("control", lambda a: a[:-1]),  # wrong size
        {k: v for k, v in good.items() if k != "single"},  # missing
    ]
    for tables in bad:
        assert not use_grammar_vocab_tables(fresh_model, tables)
    # a corrupt file is rebuilt and replaced
    monkeypatch.setenv("LLAMBA_CACHE_DIR", str(tmp_path / "cache"))
    path = cache_path(model_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PK\x03\x04 not really a zip")
    assert prime_grammar_vocab(fresh_model, model_path) == "built"
    assert path.stat().st_size > 1000
    for name, table in grammar_vocab_tables(fresh_model).items():
        assert np.array_equal(table, good[name]), name


def test_unwritable_cache_is_not_an_error(tmp_path, monkeypatch, model_path, model):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("LLAMBA_CACHE_DIR", str(blocker / "cache"))
    assert prime_grammar_vocab(model, model_path) == "built, not stored"


def test_another_model_file_gets_another_name(tmp_path, monkeypatch, model_path):
    monkeypatch.setenv("LLAMBA_CACHE_DIR", str(tmp_path))
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF" + b"\0" * 100)
    assert cache_path(other) != cache_path(model_path)
    assert cache_path(model_path).parent == tmp_path


def test_read_before_the_model_then_adopted_or_built(tmp_path, monkeypatch, model_path, model):
    """What a job reads while its model loads (and a server before it reports ready):
    nothing stored yet, so the tables are built and stored where it looked; read again,
    they are adopted by a model that has none yet."""
    monkeypatch.setenv("LLAMBA_CACHE_DIR", str(tmp_path / "cache"))
    empty = read_grammar_vocab(model_path)
    assert empty.tables is None and not empty.path.exists()
    assert build_grammar_vocab(model, empty) == "built"
    assert empty.path.is_file()
    stored = read_grammar_vocab(model_path)
    assert stored.tables is not None and stored.path == empty.path
    other = Model(model_path)
    try:
        assert adopt_grammar_vocab(other, stored)
        assert prime_grammar_vocab(other, model_path, stored) == "cached"
    finally:
        other.close()
    assert not adopt_grammar_vocab(model, empty)  # nothing to adopt
