"""Shared fixtures: the real embedded model, loaded once per test session, and
llama-cpp-python's own `Llama` as the reference llamba is checked against.

Two kinds of comparison, and the rule for each:

- **The same computation** (llamba at 1 slot without the prefix cache, against
  `Llama` evaluating each prompt whole after `reset()`): every `llama_decode` has the
  same shape, so the logits are the same bits. Assert equality.
- **A different batch shape** (more slots, a shared prefix, a preempted and
  recomputed row): llama.cpp picks kernels by batch shape, and its logits move by an
  amount that differs from CPU to CPU (AMX or not, weight repacking or not, x86 or
  arm64). Never a tolerance tuned on one machine: `Reference.shape_noise` measures
  llama.cpp's own noise, in the same test run, by evaluating the same tokens as one
  sequence split into decodes of other sizes (`SHAPES`), and tests allow
  `NOISE_FACTOR` times that. `benchmarks/bench_noise.py` records both figures.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.reference import SHAPES, Reference, load_llama
from llamba_cli.engine import Engine, EngineConfig, Model
from llamba_cli.engine.config import default_threads
from llamba_cli.job.models import resolve_model_path

REPO = Path(__file__).resolve().parent.parent

# Context settings shared by `make_engine` and the reference, so that llamba at one
# slot and `Llama` build the same llama.cpp context (flash attention changes logits
# by up to ~1 nat, so it must match; llama-cpp-python's `Llama` defaults it off).
N_CTX_SEQ = 512
N_BATCH = 512
THREADS = default_threads()

# A batch of many sequences mixes kernels that one sequence split into pieces does not
# reproduce exactly. On an AMD EPYC (AVX-512, weight repacking on) llamba's largest
# batch change of a log-probability was 1.7x llama.cpp's own largest split change
# (16 slots: 0.75 vs 0.43 nats; 8 slots: 0.41 vs 0.43); `benchmarks/bench_noise.py`
# reports the ratio on any machine. Bug-sized errors (another row's logits, a wrong
# KV cell) are several nats.
NOISE_FACTOR = 3.0


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
        kw.setdefault("n_ctx_seq", N_CTX_SEQ)
        kw.setdefault("n_batch", N_BATCH)
        kw.setdefault("n_threads", THREADS)
        eng = Engine(EngineConfig(model_path=str(model_path), **kw), model=model)  # type: ignore[arg-type]
        made.append(eng)
        return eng

    yield make
    for eng in made:
        eng.close()


@pytest.fixture(scope="session")
def reference_llm(model_path: Path) -> Iterator:
    """llama-cpp-python's own high-level `Llama` with the context settings of
    `make_engine` at one slot, weights laid out as llamba lays them out. Call
    `reset()` before each prompt that must be evaluated whole."""
    llm = load_llama(
        model_path,
        n_ctx=N_CTX_SEQ,
        n_batch=N_BATCH,
        n_ubatch=N_BATCH,
        n_threads=THREADS,
        n_threads_batch=THREADS,
        flash_attn=True,
        swa_full=True,
        verbose=False,
        seed=0,
    )
    yield llm
    llm.close()


@pytest.fixture(scope="session")
def reference(reference_llm: object) -> Reference:
    """The same `Llama`, driven decode by decode (see benchmarks/reference.py)."""
    return Reference(reference_llm)


__all__ = ["NOISE_FACTOR", "SHAPES"]
