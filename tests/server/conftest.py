"""Servers shared by a test module: the real `llamba serve`, started as a subprocess."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.server.serving import Server, start_server


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """4 slots x 512 tokens, an API key; shared by a test module."""
    s = start_server("--slots", "4", "--ctx", "512", "--max-queue", "64")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def one_slot_server() -> Iterator[Server]:
    """1 slot, at most 1 request waiting: references "alone at 1 slot", and a full queue."""
    s = start_server("--slots", "1", "--ctx", "512", "--max-queue", "1")
    yield s
    s.stop()
