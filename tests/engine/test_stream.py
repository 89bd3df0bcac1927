"""Per-step outputs, abort, deadlines and bounded queues on the real model."""

from __future__ import annotations

import time

import pytest

from llamba_cli.engine import Engine, Request, RequestOutput, SamplingParams
from llamba_cli.errors import ConfigError

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at a temperature of",
]
GREEDY = SamplingParams(temperature=0, max_tokens=16)


def step_all(engine: Engine, limit: int = 2000) -> list[RequestOutput]:
    outs: list[RequestOutput] = []
    for _ in range(limit):
        if not engine.has_work:
            return outs
        outs.extend(engine.step())
    raise AssertionError(f"still working after {limit} steps")


def of(outs: list[RequestOutput], req: Request) -> list[RequestOutput]:
    return [o for o in outs if o.request is req]


def test_deltas_concatenate_to_the_final_text_and_stop_strings_never_leak(make_engine):
    # 1 slot: each row is computed alone, so a second run generates the same tokens.
    engine = make_engine(slots=1, prefix_cache=False)
    free = [Request(id=i, prompt=p, params=GREEDY) for i, p in enumerate(PROMPTS)]
    outs = step_all(engine_with(engine, free))
    # Stop at a few characters from the middle of each free text: most span tokens.
    stopped = []
    for r in free:
        mid = len(r.text) // 2
        stop = r.text[mid - 2 : mid + 2]
        assert len(stop) == 4
        params = SamplingParams(temperature=0, max_tokens=16, stop=(stop, "never appears"))
        stopped.append(Request(id=r.id, prompt=r.prompt, params=params))
    outs += step_all(engine_with(engine, stopped))
    for r in free + stopped:
        mine = of(outs, r)
        assert [o.finished for o in mine] == [False] * (len(mine) - 1) + [True]
        assert "".join(o.text for o in mine) == r.text
        assert [t for o in mine for t in o.token_ids] == r.generated()
        assert all(o.logprobs is None for o in mine)
    for r, s in zip(free, stopped, strict=True):
        stop = s.params.stop[0]
        assert s.finish_reason == "stop"
        assert s.text == r.text[: r.text.find(stop)]


def engine_with(engine: Engine, reqs: list[Request]) -> Engine:
    for r in reqs:
        engine.submit(r)
    return engine


def test_abort_frees_the_sequence_at_the_next_step(make_engine):
    engine = make_engine(slots=2, prefix_cache=False)
    long = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    keep = Request(id="keep", prompt=PROMPTS[0], params=long)
    gone = Request(id="gone", prompt=PROMPTS[1], params=long)
    engine_with(engine, [keep, gone])
    for _ in range(3):
        engine.step()
    seq = gone.seq_id
    assert engine.runner.seq_pos_max(seq) >= 0
    assert engine.abort(gone)
    assert not engine.abort(gone)
    outs = engine.step()
    assert engine.runner.seq_pos_max(seq) == -1
    assert engine.runner.seq_pos_max(keep.seq_id) >= 0
    [last] = of(outs, gone)
    assert last.finished and last.token_ids == []
    assert gone.finish_reason == "abort" and gone.error is None
    assert gone.completion_tokens == 3
    step_all(engine)
    assert keep.finish_reason == "length" and keep.completion_tokens == 12
    assert not engine.abort(keep)


@pytest.mark.parametrize("aborted", ["running", "waiting"])
def test_abort_leaves_the_other_rows_text_unchanged(make_engine, aborted):
    """At 1 slot every row runs alone, so the rows after an abort compute exactly what
    they compute after a row that completed."""
    params = SamplingParams(temperature=0, max_tokens=12)

    def rows() -> list[Request]:
        return [Request(id=i, prompt=p, params=params) for i, p in enumerate(PROMPTS[:3])]

    plain = rows()
    step_all(engine_with(make_engine(slots=1, prefix_cache=False), plain))
    cut = rows()
    engine = engine_with(make_engine(slots=1, prefix_cache=False), cut)
    for _ in range(4):
        engine.step()
    victim = cut[0] if aborted == "running" else cut[1]
    assert engine.abort(victim)
    step_all(engine)
    assert victim.finish_reason == "abort"
    for a, b in zip(plain, cut, strict=True):
        if b is not victim:
            assert b.error is None and b.text == a.text


def test_deadline_ends_requests_with_abort(make_engine):
    engine = make_engine(slots=1)
    now = time.monotonic()
    late = Request(id="late", prompt=PROMPTS[0], params=GREEDY, deadline=now - 1)
    ok = Request(id="ok", prompt=PROMPTS[1], params=GREEDY, deadline=now + 600, tag={"row": 7})
    step_all(engine_with(engine, [late, ok]))
    assert late.finish_reason == "abort" and late.error == "deadline exceeded"
    assert late.completion_tokens == 0
    assert ok.error is None and ok.completion_tokens > 0
    assert ok.tag == {"row": 7}


def test_kv_pressure_with_prefix_cache_on_completes(make_engine, model):
    """Two long rows fill most of a 256-cell KV cache; then rows arrive that share a
    head which does not fit beside them.  Dropping the cached head alone would rebuild
    it on the next step, forever; the engine must go on to preempt and finish all."""
    long_prompts = [f"List {c}: " + " ".join(f"{c}{i}" for i in range(40)) for c in "xy"]
    head = "Answer in one word. " * 8
    assert all(len(model.tokenize(p)) > 100 for p in long_prompts)
    assert len(model.tokenize(head)) > 256 - 2 * 116
    engine = make_engine(slots=4, kv_cells=256)
    first_params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    first = [Request(id=f"u{i}", prompt=p, params=first_params) for i, p in enumerate(long_prompts)]
    engine_with(engine, first)
    engine.step()
    engine.step()
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    questions = ("Sky colour?", "Grass colour?", "Snow colour?", "Sea?")
    late = [Request(id=i, prompt=head + q, params=params) for i, q in enumerate(questions)]
    step_all(engine_with(engine, late), limit=400)
    assert engine.stats.kv_retries > 0
    assert [r.error for r in first + late] == [None] * 6
    assert [r.completion_tokens for r in first + late] == [16, 16] + [24] * 4
    assert engine.stats.prompt_tokens == sum(r.prompt_tokens for r in first + late)


def test_preemption_counts_each_prompt_once(make_engine):
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    # llama.cpp pads the cache to 256 cells at least; four rows need about 290.
    engine = make_engine(slots=4, prefix_cache=False, kv_cells=256)
    reqs = [Request(id=i, prompt=p, params=params) for i, p in enumerate(PROMPTS)]
    done = list(engine.run(reqs))
    st = engine.stats
    assert st.kv_retries > 0
    assert all(r.error is None and r.completion_tokens == 64 for r in done)
    assert st.prompt_tokens == sum(r.prompt_tokens for r in reqs)
    assert st.prompt_tokens_evaluated > st.prompt_tokens  # the preempted were recomputed


def test_run_keeps_a_run_of_error_rows_bounded(make_engine):
    engine = make_engine(slots=2, lookahead=8)
    pulled = 0
    in_flight: list[int] = []

    def rows():  # type: ignore[no-untyped-def]
        nonlocal pulled
        for i in range(500):
            pulled += 1
            req = Request(id=i, prompt="")
            req.finish("error", "bad row")
            yield req
        pulled += 1
        yield Request(id="real", prompt=PROMPTS[0], params=GREEDY)

    yielded = 0
    for _ in engine.run(rows()):
        yielded += 1
        in_flight.append(pulled - yielded)
    assert yielded == 501
    assert max(in_flight) <= 8


def test_run_refuses_a_non_request_instead_of_stopping(make_engine):
    engine = make_engine(slots=1)
    first = Request(id=0, prompt=PROMPTS[0], params=GREEDY)
    with pytest.raises(TypeError, match="NoneType"):
        list(engine.run([first, None, Request(id=1, prompt=PROMPTS[1], params=GREEDY)]))


def test_lookahead_must_be_positive(make_engine):
    with pytest.raises(ConfigError, match="lookahead"):
        make_engine(slots=1, lookahead=0)
