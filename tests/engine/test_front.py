"""`EngineLoop` on the real model: threads, asyncio, abort, back-pressure, failures."""

from __future__ import annotations

import asyncio
import queue
import random
import threading
import time

import pytest

from llamba_cli.engine import (
    EngineLoop,
    Request,
    RequestOutput,
    RequestStream,
    SamplingParams,
)
from llamba_cli.errors import EngineError, QueueFull

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at a temperature of",
    "def fibonacci(n):",
    "My favourite recipe for pancakes starts with",
]
GREEDY = SamplingParams(temperature=0, max_tokens=12)


@pytest.fixture
def make_loop(make_engine):  # type: ignore[no-untyped-def]
    """Loops over engines from `make_engine`; each is closed after the test."""
    loops: list[EngineLoop] = []

    def make(*, max_waiting: int = 1024, start: bool = True, **kw: object) -> EngineLoop:
        loop = EngineLoop(make_engine(**kw), max_waiting=max_waiting)
        loops.append(loop)
        if start:
            loop.start()
        return loop

    yield make
    for loop in loops:
        loop.close(drain=False)


def wait_idle(loop: EngineLoop, timeout: float = 30.0) -> None:
    """Until the loop's engine has nothing left to do (finished sequences' KV is dropped
    on the step after they finish)."""
    end = time.monotonic() + timeout
    while loop.engine.has_work:
        assert time.monotonic() < end, "the loop did not go idle"
        time.sleep(0.01)
    time.sleep(0.02)


def check_stream(outs: list[RequestOutput], req: Request) -> None:
    """A stream's outputs: all of `req`, the last one finished, deltas adding up."""
    assert outs and all(o.request is req for o in outs)
    assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
    assert "".join(o.text for o in outs) == req.text
    assert [t for o in outs for t in o.token_ids] == req.generated()


def test_stream_from_a_thread_equals_engine_run(make_engine, make_loop):
    """At 1 slot every row is computed alone, so the loop must compute exactly what
    `Engine.run` does."""
    direct = [Request(id=i, prompt=p, params=GREEDY) for i, p in enumerate(PROMPTS[:3])]
    list(make_engine(slots=1, prefix_cache=False).run(direct))
    loop = make_loop(slots=1, prefix_cache=False)
    reqs = [
        Request(id=i, prompt=p, params=GREEDY, tag=("row", i)) for i, p in enumerate(PROMPTS[:3])
    ]
    streams = [loop.submit(r) for r in reqs]
    for stream, req, ref in zip(streams, reqs, direct, strict=True):
        outs = list(stream)
        check_stream(outs, req)
        assert list(stream) == []  # a finished stream stays finished
        assert req.text == ref.text and req.finish_reason == ref.finish_reason
        assert req.tag == ("row", req.id)
    st = loop.stats()
    assert st.requests == 3 and st.generated_tokens == sum(r.completion_tokens for r in reqs)
    assert (st.queue_depth, st.waiting, st.running) == (0, 0, 0)


def test_async_iteration_from_an_event_loop(make_loop):
    loop = make_loop(slots=4)

    async def consume(req: Request) -> list[RequestOutput]:
        return [out async for out in loop.submit(req)]

    async def main() -> list[list[RequestOutput]]:
        reqs = [Request(id=i, prompt=p, params=GREEDY) for i, p in enumerate(PROMPTS)]
        ticks = 0

        async def ticker() -> None:  # the event loop stays free while the engine works
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        tick = asyncio.create_task(ticker())
        got = await asyncio.gather(*(consume(r) for r in reqs))
        tick.cancel()
        assert ticks > 10
        for outs, req in zip(got, reqs, strict=True):
            check_stream(outs, req)
        return got

    asyncio.run(main())


def test_three_threads_submit_and_abort_while_a_fourth_consumes(make_loop):
    loop = make_loop(slots=3, n_ctx_seq=256)
    streams: queue.Queue[RequestStream | None] = queue.Queue()
    aborted: set[int] = set()
    lock = threading.Lock()
    errors: list[BaseException] = []

    def submitter(t: int) -> None:
        rng = random.Random(t)
        try:
            mine = []
            for k in range(5):
                params = SamplingParams(temperature=0.8, seed=t * 10 + k, max_tokens=10)
                req = Request(id=t * 10 + k, prompt=PROMPTS[(t + k) % len(PROMPTS)], params=params)
                streams.put(loop.submit(req))
                mine.append(req)
                time.sleep(rng.uniform(0, 0.02))
                if k % 2 == 0:  # abort some at once (queued), some later (running)
                    victim = mine[rng.randrange(len(mine))]
                    loop.abort(victim)
                    with lock:
                        aborted.add(victim.id)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    results: dict[int, list[RequestOutput]] = {}

    def consumer() -> None:
        while (stream := streams.get()) is not None:
            results[stream.request.id] = list(stream)

    threads = [threading.Thread(target=submitter, args=(t,)) for t in range(3)]
    reader = threading.Thread(target=consumer)
    reader.start()
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    streams.put(None)
    reader.join(timeout=120)
    assert not errors and not reader.is_alive()
    assert sorted(results) == sorted(t * 10 + k for t in range(3) for k in range(5))
    for rid, outs in results.items():
        req = outs[-1].request
        check_stream(outs, req)
        if req.finish_reason == "abort":
            assert rid in aborted and req.error is None
        else:
            assert req.finish_reason in ("stop", "length") and req.error is None
    assert any(r[-1].request.finish_reason == "abort" for r in results.values())
    wait_idle(loop)
    st = loop.stats()
    assert (st.queue_depth, st.running, st.waiting) == (0, 0, 0)
    # Every sequence's KV was dropped once its request ended (aborted ones included).
    assert [loop.engine.runner.seq_pos_max(s) for s in range(3)] == [-1, -1, -1]


def test_abort_of_a_running_request_frees_its_sequence(make_loop):
    loop = make_loop(slots=2, prefix_cache=False)
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    req = Request(id="long", prompt=PROMPTS[0], params=long)
    stream = loop.submit(req)
    first = next(stream)
    assert not first.finished and first.token_ids
    seq = req.seq_id
    loop.abort(req)
    rest = list(stream)
    assert rest[-1].finished and req.finish_reason == "abort"
    assert req.completion_tokens < 200
    # The step that reports the abort has already dropped the sequence's KV.
    assert loop.engine.runner.seq_pos_max(seq) == -1


def test_queue_full_is_immediate_and_close_drains(make_loop):
    loop = make_loop(slots=1, max_waiting=2, start=False)
    a = loop.submit(Request(id="a", prompt=PROMPTS[0], params=GREEDY))
    b = loop.submit(Request(id="b", prompt=PROMPTS[1], params=GREEDY))
    t0 = time.perf_counter()
    with pytest.raises(QueueFull):
        loop.submit(Request(id="c", prompt=PROMPTS[2], params=GREEDY))
    assert time.perf_counter() - t0 < 0.1
    assert loop.stats().queue_depth == 2
    loop.start()
    loop.close()  # drain: both accepted requests finish
    assert a.result().finish_reason in ("stop", "length")
    assert b.result().finish_reason in ("stop", "length")
    with pytest.raises(EngineError, match="closed"):
        loop.submit(Request(id="d", prompt=PROMPTS[0], params=GREEDY))


def test_close_without_drain_aborts_what_is_left(make_loop):
    loop = make_loop(slots=1)
    long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    streams = [loop.submit(Request(id=i, prompt=p, params=long)) for i, p in enumerate(PROMPTS)]
    next(streams[0])
    loop.close(drain=False)
    reasons = [s.result().finish_reason for s in streams]
    assert reasons == ["abort"] * len(PROMPTS)


def test_idle_loop_uses_no_cpu(make_loop):
    loop = make_loop(slots=1)
    loop.submit(Request(id=0, prompt=PROMPTS[0], params=GREEDY)).result()
    time.sleep(0.05)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    time.sleep(1.0)
    cpu = time.process_time() - cpu0
    wall = time.perf_counter() - wall0
    assert cpu < 0.02 * wall, f"{cpu:.3f}s of CPU in {wall:.2f}s idle"


class BetweenSteps:
    """Takes the place of an asyncio loop in a stream's waker, so `action` runs on the
    engine thread between two steps, once (a test's way in, where nothing else runs)."""

    def __init__(self, action) -> None:  # type: ignore[no-untyped-def]
        self.action = action

    def call_soon_threadsafe(self, callback) -> None:  # type: ignore[no-untyped-def]
        action, self.action = self.action, None
        if action is not None:
            action()


def test_a_failed_step_reaches_the_running_requests_and_the_loop_goes_on(make_loop):
    """llama.cpp rejecting a batch (positions that do not follow the sequence's KV)
    fails the requests in it; queued requests and later ones still run."""
    loop = make_loop(slots=1, prefix_cache=False, start=False)
    long = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    bad = Request(id="bad", prompt=PROMPTS[0], params=long)
    bad_stream = loop.submit(bad)
    good_stream = loop.submit(Request(id="good", prompt=PROMPTS[1], params=GREEDY))

    def corrupt() -> None:
        bad.num_computed -= 2

    bad_stream._waker = (BetweenSteps(corrupt), asyncio.Event())  # type: ignore[assignment]
    loop.start()
    with pytest.raises(EngineError, match="llama_decode"):
        list(bad_stream)
    assert bad.completion_tokens == 1
    good = good_stream.result()
    assert good.finish_reason in ("stop", "length") and good.error is None
    after = loop.submit(Request(id="after", prompt=PROMPTS[2], params=GREEDY)).result()
    assert after.error is None and after.completion_tokens > 0
    wait_idle(loop)
    assert loop.engine.runner.seq_pos_max(0) == -1


def test_a_bad_request_fails_its_own_stream_only(make_loop):
    loop = make_loop(slots=1)
    broken = loop.submit(Request(id="broken", prompt=None))  # type: ignore[arg-type]
    with pytest.raises(EngineError, match="cannot queue"):
        list(broken)
    ok = loop.submit(Request(id="ok", prompt=PROMPTS[0], params=GREEDY)).result()
    assert ok.error is None
