from __future__ import annotations

import random
import tracemalloc

from llamba_cli.job.ids import SeenIds


def test_membership_matches_a_python_set_across_merges():
    rng = random.Random(3)
    ours, ref = SeenIds(buffer_size=64), set()
    for _ in range(5000):
        h = rng.getrandbits(64) if rng.random() < 0.7 else rng.choice(sorted(ref) or [1])
        assert ours.add(h) == (h not in ref)
        ref.add(h)
    assert len(ours) == len(ref)
    assert all(h in ours for h in ref)
    assert not any(rng.getrandbits(64) in ours for _ in range(1000))


def test_memory_is_about_eight_bytes_an_id():
    tracemalloc.start()
    ids = SeenIds()
    for i in range(300_000):
        ids.add((i * 0x9E3779B97F4A7C15) & ((1 << 64) - 1))
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert current < 300_000 * 20  # a Python set would take ~60 bytes an id
