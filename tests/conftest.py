"""Shared fixtures: the real embedded model, loaded once per test session."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from llamba_cli.engine import Engine, EngineConfig, Model
from llamba_cli.engine.llama import repack_supported
from llamba_cli.job.models import resolve_model_path

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def model_path() -> Path:
    return resolve_model_path(None)


@pytest.fixture(scope="session")
def model(model_path: Path) -> Iterator[Model]:
    m = Model(model_path)
    yield m
    m.close()


@pytest.fixture
def make_engine(model: Model, model_path: Path) -> Iterator:
    """Build engines on the shared model; all are closed after the test."""
    made: list[Engine] = []

    def make(**kw: object) -> Engine:
        kw.setdefault("flash_attn", "on")
        kw.setdefault("n_ctx_seq", 512)
        eng = Engine(EngineConfig(model_path=str(model_path), **kw), model=model)  # type: ignore[arg-type]
        made.append(eng)
        return eng

    yield make
    for eng in made:
        eng.close()


@contextlib.contextmanager
def same_weights_as_llamba() -> Iterator[None]:
    """Make llama-cpp-python's `Llama` load weights the way llamba does: without
    llama.cpp's extra CPU buffer types on CPUs whose AMX path crashes (see
    `repack_supported`). `Llama` has no argument for it."""
    import llama_cpp.llama_cpp as lc

    original = lc.llama_model_default_params

    def params():  # type: ignore[no-untyped-def]
        p = original()
        p.use_extra_bufts = repack_supported()
        return p

    lc.llama_model_default_params = params
    try:
        yield
    finally:
        lc.llama_model_default_params = original


def _reference(model_path: Path, logits_all: bool) -> Iterator:
    from llama_cpp import Llama

    with same_weights_as_llamba():
        llm = Llama(
            str(model_path),
            n_ctx=1024,
            n_batch=512,
            flash_attn=True,
            logits_all=logits_all,
            verbose=False,
            seed=0,
        )
    yield llm
    llm.close()


@pytest.fixture(scope="session")
def reference_llm(model_path: Path) -> Iterator:
    """llama-cpp-python's own high-level `Llama`, flash attention on as in llamba's tests."""
    yield from _reference(model_path, logits_all=False)


@pytest.fixture(scope="session")
def reference_scorer(model_path: Path) -> Iterator:
    """The same, with logits for every token: the slow, obvious way to score labels."""
    yield from _reference(model_path, logits_all=True)
