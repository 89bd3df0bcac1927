"""`Scheduler` (and its `PrefixCache`) without a model.

Requests carry preset `tokens` / `num_prompt`; a step is simulated the way the
engine does it: every chunk's owner gets `num_computed = chunk.end`, and a
generation request whose known tokens are all computed gets one more token (or is
released once it has generated its quota).
"""

from __future__ import annotations

import numpy as np
import pytest

from llamba_cli.engine.config import SamplingParams
from llamba_cli.engine.prefix_cache import PrefixCache, PrefixEntry
from llamba_cli.engine.request import Request, Status
from llamba_cli.engine.scheduler import Chunk, Plan, Scheduler

NEXT_TOKEN = 90_000  # generated tokens: never part of a prompt


def make_req(i: int, prompt: list[int] | range, max_new: int = 3) -> Request:
    req = Request(id=i, prompt="", params=SamplingParams(max_tokens=max_new))
    req.tokens = list(prompt)
    req.num_prompt = len(req.tokens)
    return req


def unique_prompt(i: int, n: int) -> list[int]:
    return [1000 * (i + 1) + j for j in range(n)]


def shared_prompt(head: list[int], i: int, tail: int = 20) -> list[int]:
    return head + [500_000 + 1000 * i + j for j in range(tail)]


HEAD = list(range(1, 101))  # a 100-token shared head


def check_plan(sched: Scheduler, plan: Plan) -> None:
    """Invariants of every plan, checked before the step is applied."""
    assert plan.n_tokens <= sched.n_batch
    owners = [id(c.owner) for c in plan.chunks]
    assert len(owners) == len(set(owners)), "an owner got two chunks in one step"
    for c in plan.chunks:
        assert c.start == c.owner.num_computed
        assert c.start < c.end <= len(c.owner.tokens)
    # decodes (one pending token) come before every prefill chunk
    is_decode = [isinstance(c.owner, Request) and c.owner.num_pending == 1 for c in plan.chunks]
    assert is_decode == sorted(is_decode, reverse=True), is_decode
    # every running request with exactly one pending token got its decode
    decoded = {id(c.owner) for c, d in zip(plan.chunks, is_decode, strict=True) if d}
    assert {id(r) for r in sched.running if r.num_pending == 1} <= decoded
    # a free slot is never left idle while requests wait (unless deferred on a prefix)
    if sched.prefix_cache is None:
        assert not (sched.free_seqs and sched.waiting)
    seqs = [r.seq_id for r in sched.running]
    assert len(seqs) == len(set(seqs))
    assert not set(seqs) & set(sched.free_seqs)


def advance(sched: Scheduler, plan: Plan) -> list[Request]:
    """Apply a step as the engine does; returns the requests that finished."""
    finished = []
    for c in plan.chunks:
        owner = c.owner
        owner.num_computed = c.end
        if isinstance(owner, Request) and c.end == len(owner.tokens):
            owner.tokens.append(NEXT_TOKEN + len(owner.generated()))
            owner.completion_tokens += 1
            if owner.completion_tokens >= owner.params.max_tokens:
                sched.release(owner)
                owner.finish("length")
                finished.append(owner)
    return finished


def run_to_end(sched: Scheduler, max_steps: int = 1000) -> list[Plan]:
    plans = []
    while sched.has_work:
        plan = sched.schedule()
        check_plan(sched, plan)
        assert plan.chunks, "work left but nothing scheduled"
        plans.append(plan)
        advance(sched, plan)
        assert len(plans) < max_steps
    return plans


def spans(plan: Plan) -> list[tuple[object, int, int]]:
    return [
        (c.owner.id if isinstance(c.owner, Request) else "prefix", c.start, c.end)
        for c in plan.chunks
    ]


# -- without a prefix cache ----------------------------------------------------------------


def test_mixed_workload_respects_batch_and_generates_everything() -> None:
    sched = Scheduler(slots=4, n_batch=32)
    lengths = [50, 10, 70, 5, 40, 3, 33, 1]
    reqs = [make_req(i, unique_prompt(i, n), max_new=4 + i % 3) for i, n in enumerate(lengths)]
    for r in reqs:
        sched.add(r)
    plans = run_to_end(sched)
    for r in reqs:
        assert r.finished
        assert r.generated() == [NEXT_TOKEN + k for k in range(r.params.max_tokens)]
        assert r.num_computed == len(r.tokens) - 1  # the last token is never computed
    # every known token was computed exactly once
    total = sum(p.n_tokens for p in plans)
    assert total == sum(n + r.params.max_tokens - 1 for n, r in zip(lengths, reqs, strict=True))
    assert not sched.running and not sched.waiting
    assert sorted(sched.free_seqs) == [0, 1, 2, 3]


def test_long_prompt_is_chunked_across_steps() -> None:
    sched = Scheduler(slots=2, n_batch=16)
    sched.add(make_req(0, unique_prompt(0, 40), max_new=2))
    p1 = sched.schedule()
    assert spans(p1) == [(0, 0, 16)]
    advance(sched, p1)
    p2 = sched.schedule()
    assert spans(p2) == [(0, 16, 32)]
    advance(sched, p2)
    p3 = sched.schedule()
    assert spans(p3) == [(0, 32, 40)]
    advance(sched, p3)
    p4 = sched.schedule()  # the sampled token: a decode
    assert spans(p4) == [(0, 40, 41)]


def test_decode_comes_first_and_prompt_gets_the_rest_of_the_budget() -> None:
    sched = Scheduler(slots=3, n_batch=16)
    a = make_req("a", unique_prompt(0, 3), max_new=10)
    sched.add(a)
    advance(sched, sched.schedule())  # a's prompt; a now has one pending token
    b = make_req("b", unique_prompt(1, 40), max_new=2)
    c = make_req("c", unique_prompt(2, 4), max_new=2)
    sched.add(b)
    sched.add(c)
    p = sched.schedule()
    check_plan(sched, p)
    assert spans(p) == [("a", 3, 4), ("b", 0, 15)]  # c waits for budget, oldest first
    advance(sched, p)
    p = sched.schedule()
    check_plan(sched, p)
    assert spans(p) == [("a", 4, 5), ("b", 15, 30)]
    advance(sched, p)
    p = sched.schedule()
    check_plan(sched, p)
    assert spans(p) == [("a", 5, 6), ("b", 30, 40), ("c", 0, 4)]


def test_slot_refilled_the_step_a_request_is_released() -> None:
    sched = Scheduler(slots=2, n_batch=64)
    a, b, c = (
        make_req(n, unique_prompt(i, 5), max_new=1 if n == "a" else 5) for i, n in enumerate("abc")
    )
    for r in (a, b, c):
        sched.add(r)
    p = sched.schedule()
    assert [r.id for r in sched.running] == ["a", "b"]
    assert list(sched.waiting) == [c]
    a_seq = a.seq_id
    assert advance(sched, p) == [a]  # a generated its one token and was released
    assert a_seq in sched.free_seqs
    p = sched.schedule()
    check_plan(sched, p)
    assert c.status is Status.RUNNING
    assert c.seq_id == a_seq
    assert spans(p) == [("b", 5, 6), ("c", 0, 5)]


def test_preempt_requeues_the_newest_at_the_head() -> None:
    sched = Scheduler(slots=3, n_batch=64)
    reqs = [make_req(i, unique_prompt(i, 6), max_new=5) for i in range(4)]
    for r in reqs:
        sched.add(r)
    advance(sched, sched.schedule())
    advance(sched, sched.schedule())
    newest = reqs[2]
    seq = newest.seq_id
    assert newest.num_computed == 7
    newest.cached_tokens = 3
    assert sched.preempt() is newest
    assert [r.id for r in sched.running] == [0, 1]
    assert list(sched.waiting) == [newest, reqs[3]]
    assert newest.status is Status.WAITING
    assert newest.num_computed == 0
    assert newest.cached_tokens == 0
    assert newest.tokens[:6] == unique_prompt(2, 6)  # its known tokens are kept
    assert len(newest.tokens) == 8
    assert seq in sched.free_seqs
    assert sched.preempt() is reqs[1]
    assert sched.preempt() is None  # never the last running request
    assert [r.id for r in sched.running] == [0]


def test_preemption_relieves_kv_demand() -> None:
    sched = Scheduler(slots=2, n_batch=64)
    a = make_req("a", unique_prompt(0, 10), max_new=50)
    b = make_req("b", unique_prompt(1, 20), max_new=50)
    sched.add(a)
    sched.add(b)
    advance(sched, sched.schedule())
    failed = sched.schedule()  # two decodes; suppose llama.cpp finds no KV room for them
    assert spans(failed) == [("a", 10, 11), ("b", 20, 21)]
    victim = sched.preempt()
    assert victim is b
    freed = 20  # b's computed cells, dropped by the engine
    retry = sched.schedule()
    new_cells = retry.n_tokens
    assert new_cells - freed < failed.n_tokens, spans(retry)


def test_chunks_start_at_num_computed_of_partially_computed_requests() -> None:
    sched = Scheduler(slots=1, n_batch=8)
    r = make_req(0, unique_prompt(0, 20))
    sched.add(r)
    p = sched.schedule()
    r.num_computed = 5  # the engine may compute less than planned (never more)
    p = sched.schedule()
    assert spans(p) == [(0, 5, 13)]


# -- prefix cache -------------------------------------------------------------------------


def cache_sched(
    slots: int = 4,
    n_batch: int = 512,
    budget: int = 4096,
    min_tokens: int = 16,
    lookahead: int = 64,
) -> Scheduler:
    cache = PrefixCache(range(slots, slots + 8), budget=budget, min_tokens=min_tokens)
    return Scheduler(slots=slots, n_batch=n_batch, prefix_cache=cache, lookahead=lookahead)


def entries(sched: Scheduler) -> list[PrefixEntry]:
    assert sched.prefix_cache is not None
    return sched.prefix_cache.entries


def test_shared_head_is_computed_once_then_copied() -> None:
    sched = cache_sched()
    reqs = [make_req(i, shared_prompt(HEAD, i), max_new=2) for i in range(4)]
    for r in reqs:
        sched.add(r)
    p1 = sched.schedule()
    check_plan(sched, p1)
    assert len(entries(sched)) == 1
    entry = entries(sched)[0]
    assert entry.seq_id == 4
    assert entry.tokens == HEAD
    assert not sched.running  # all deferred until the head is computed
    assert list(sched.waiting) == reqs
    assert [(c.owner, c.start, c.end) for c in p1.chunks] == [(entry, 0, 100)]
    assert p1.copies == [] and p1.evict == []
    advance(sched, p1)
    assert entry.ready

    p2 = sched.schedule()
    check_plan(sched, p2)
    assert sched.running == reqs
    seqs = [r.seq_id for r in reqs]
    assert sorted(seqs) == [0, 1, 2, 3]
    assert p2.copies == [(4, s, 100) for s in seqs]
    for r in reqs:
        assert r.num_computed == r.cached_tokens == 100
    assert spans(p2) == [(i, 100, 120) for i in range(4)]
    assert p2.evict == []
    assert len(entries(sched)) == 1

    plans = run_to_end(sched)
    assert all(p.copies == [] for p in plans)
    assert all(r.generated() == [NEXT_TOKEN, NEXT_TOKEN + 1] for r in reqs)


def test_requests_wait_until_a_chunked_prefix_is_complete() -> None:
    sched = cache_sched(n_batch=64)
    reqs = [make_req(i, shared_prompt(HEAD, i), max_new=1) for i in range(3)]
    for r in reqs:
        sched.add(r)
    p1 = sched.schedule()
    entry = entries(sched)[0]
    assert spans(p1) == [("prefix", 0, 64)]
    advance(sched, p1)
    p2 = sched.schedule()
    assert spans(p2) == [("prefix", 64, 100)]
    assert not sched.running
    advance(sched, p2)
    p3 = sched.schedule()
    assert p3.copies == [(entry.seq_id, r.seq_id, 100) for r in reqs]
    assert spans(p3) == [(0, 100, 120), (1, 100, 120), (2, 100, 120)]


def test_late_request_reuses_a_computed_entry_at_once() -> None:
    sched = cache_sched()
    first = [make_req(i, shared_prompt(HEAD, i)) for i in range(2)]
    for r in first:
        sched.add(r)
    advance(sched, sched.schedule())
    advance(sched, sched.schedule())
    entry = entries(sched)[0]
    late = make_req(9, HEAD[:60] + [7] * 30)  # shares 60 tokens of the entry
    sched.add(late)
    p = sched.schedule()
    assert late.status is Status.RUNNING
    assert (entry.seq_id, late.seq_id, 60) in p.copies
    assert late.num_computed == late.cached_tokens == 60
    assert (9, 60, 90) in spans(p)
    assert len(entries(sched)) == 1


@pytest.mark.parametrize(("shared", "makes_entry"), [(15, False), (16, True)])
def test_min_tokens_threshold(shared: int, makes_entry: bool) -> None:
    sched = cache_sched()
    reqs = [make_req(i, HEAD[:shared] + unique_prompt(i, 10)) for i in range(3)]
    for r in reqs:
        sched.add(r)
    p = sched.schedule()
    check_plan(sched, p)
    if makes_entry:
        assert [e.tokens for e in entries(sched)] == [HEAD[:shared]]
        assert not sched.running
    else:
        assert entries(sched) == []
        assert sched.running == reqs
        assert p.copies == []
        assert all(r.cached_tokens == 0 and r.num_computed == 0 for r in reqs)
        assert spans(p) == [(i, 0, shared + 10) for i in range(3)]


def test_identical_prompts_share_all_but_the_last_token() -> None:
    sched = cache_sched()
    prompt = unique_prompt(0, 40)
    reqs = [make_req(i, prompt, max_new=2) for i in range(3)]
    for r in reqs:
        sched.add(r)
    p1 = sched.schedule()
    assert [e.tokens for e in entries(sched)] == [prompt[:39]]
    advance(sched, p1)
    p2 = sched.schedule()
    check_plan(sched, p2)
    entry = entries(sched)[0]
    assert p2.copies == [(entry.seq_id, r.seq_id, 39) for r in reqs]
    for r in reqs:
        assert r.num_computed == r.cached_tokens == 39
        assert r.num_pending == 1
    assert spans(p2) == [(i, 39, 40) for i in range(3)]  # all decodes


def test_lookahead_limits_which_queued_prompts_are_compared() -> None:
    # r0 shares its head only with r3; with lookahead 2 the queue r1, r2, r3 is seen
    # as r1, r2 when r0 is looked up, so r0 makes no entry (r3 then shares with r0).
    sched = cache_sched(slots=1, lookahead=2)
    r0 = make_req(0, [*HEAD[:30], 1])
    others = [make_req(i, unique_prompt(i, 30)) for i in (1, 2)]
    r3 = make_req(3, [*HEAD[:30], 2])
    for r in (r0, *others, r3):
        sched.add(r)
    p = sched.schedule()
    assert entries(sched) == []
    assert sched.running == [r0]
    assert spans(p) == [(0, 0, 31)]


def run_group(sched: Scheduler, reqs: list[Request]) -> list[Plan]:
    for r in reqs:
        sched.add(r)
    return run_to_end(sched)


def test_eviction_when_sequence_ids_run_out() -> None:
    sched = cache_sched(slots=2)
    heads = [[10_000 * (g + 1) + j for j in range(30)] for g in range(9)]
    for g in range(8):
        plans = run_group(
            sched, [make_req(f"{g}.{i}", shared_prompt(heads[g], i, 5)) for i in range(2)]
        )
        assert all(p.evict == [] for p in plans)
    assert [e.seq_id for e in entries(sched)] == list(range(2, 10))
    assert sched.prefix_cache is not None and sched.prefix_cache.free_ids == []
    # the ninth group evicts the least recently used entry (group 0's, seq 2)
    reqs = [make_req(f"8.{i}", shared_prompt(heads[8], i, 5)) for i in range(2)]
    for r in reqs:
        sched.add(r)
    p = sched.schedule()
    assert p.evict == [2]
    assert len(entries(sched)) == 8
    new = next(e for e in entries(sched) if e.tokens == heads[8])
    assert new.seq_id == 2
    assert all(e.tokens != heads[0] for e in entries(sched))


def test_eviction_follows_recent_use() -> None:
    sched = cache_sched(slots=2)
    heads = [[10_000 * (g + 1) + j for j in range(30)] for g in range(9)]
    for g in range(8):
        run_group(sched, [make_req(f"{g}.{i}", shared_prompt(heads[g], i, 5)) for i in range(2)])
    # reuse group 0's entry: group 1's (seq 3) becomes the least recently used
    run_group(sched, [make_req("0.x", shared_prompt(heads[0], 7, 5))])
    sched_reqs = [make_req(f"8.{i}", shared_prompt(heads[8], i, 5)) for i in range(2)]
    for r in sched_reqs:
        sched.add(r)
    assert sched.schedule().evict == [3]


def test_eviction_when_token_budget_runs_out() -> None:
    sched = cache_sched(budget=150)
    run_group(sched, [make_req(f"a{i}", shared_prompt(HEAD, i), max_new=1) for i in range(2)])
    old = entries(sched)[0]
    head_b = [7000 + j for j in range(100)]
    for r in [make_req(f"b{i}", shared_prompt(head_b, i), max_new=1) for i in range(2)]:
        sched.add(r)
    p = sched.schedule()
    assert p.evict == [old.seq_id]  # 100 + 100 > 150
    assert [e.tokens for e in entries(sched)] == [head_b]
    assert sched.prefix_cache is not None and sched.prefix_cache.used_tokens == 100


def test_prefix_longer_than_budget_is_not_cached() -> None:
    sched = cache_sched(budget=50)
    reqs = [make_req(i, shared_prompt(HEAD, i)) for i in range(2)]
    for r in reqs:
        sched.add(r)
    p = sched.schedule()
    assert entries(sched) == [] and p.evict == [] and p.copies == []
    assert sched.running == reqs


def test_entry_copied_this_step_is_not_evicted_this_step() -> None:
    sched = cache_sched(budget=150)
    a = [make_req(f"a{i}", shared_prompt(HEAD, i), max_new=50) for i in range(2)]
    for r in a:
        sched.add(r)
    advance(sched, sched.schedule())  # entry for HEAD computed
    advance(sched, sched.schedule())  # a0, a1 admitted with copies
    entry = entries(sched)[0]
    late = make_req("a2", shared_prompt(HEAD, 2))
    head_b = [7000 + j for j in range(100)]
    b = [make_req(f"b{i}", shared_prompt(head_b, i)) for i in range(2)]
    for r in (late, *b):
        sched.add(r)
    p = sched.schedule()
    assert (entry.seq_id, late.seq_id, 100) in p.copies  # late took HEAD's KV ...
    copy_sources = {src for src, _, _ in p.copies}
    assert not copy_sources & set(p.evict), (p.copies, p.evict)  # ... which is dropped first


def test_prefix_cache_lookup_directly() -> None:
    cache = PrefixCache(range(8, 10), budget=100, min_tokens=4)
    p = np.arange(20, dtype=np.int32)
    hit, evicted = cache.lookup(p, [np.arange(20, dtype=np.int32)])
    assert hit is not None and evicted == []
    assert hit.n == 19 and not hit.ready and hit.entry.seq_id == 8
    hit.entry.num_computed = 19
    q = np.concatenate([np.arange(10), [99, 98]]).astype(np.int32)
    hit2, _ = cache.lookup(q, [])
    assert hit2 is not None and hit2.entry is hit.entry and hit2.n == 10 and hit2.ready
    # no entry and nothing to share with
    assert cache.lookup(np.arange(50, 60, dtype=np.int32), []) == (None, [])
    # a second entry, then a third: both ids are taken, so the least recently used
    # entry goes (seq 8, last used by the second lookup; seq 9 by the fourth)
    r = np.arange(100, 130, dtype=np.int32)
    hit3, ev = cache.lookup(r, [r.copy()])
    assert hit3 is not None and hit3.entry.seq_id == 9 and ev == []
    s = np.arange(200, 230, dtype=np.int32)
    cache.begin_step()  # as the scheduler does each step: seq 8 was shared last step
    hit4, ev = cache.lookup(s, [s.copy()])
    assert ev == [8] and hit4 is not None and hit4.entry.seq_id == 8
    assert cache.used_tokens == 29 + 29
    assert cache.evict_all() == [9, 8]
    assert cache.entries == [] and sorted(cache.free_ids) == [8, 9]


def test_chunk_and_plan_basics() -> None:
    r = make_req(0, [1, 2, 3])
    plan = Plan(chunks=[Chunk(r, 0, 2), Chunk(r, 2, 3)])
    assert plan.n_tokens == 3
    assert Plan().n_tokens == 0
