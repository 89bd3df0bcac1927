"""`EngineLoop`: one engine on a thread of its own, for callers on any thread.

    loop = EngineLoop(Engine(config), max_waiting=256)
    loop.start()
    stream = loop.submit(Request(id=1, prompt="Hello", params=params))
    for out in stream:                  # a thread: blocks for each output
        print(out.text, end="")
    async for out in loop.submit(req):  # an asyncio task: awaits each output
        ...
    loop.close()

An `Engine` is not thread-safe, so only the loop's thread touches it.  Other threads
(or an asyncio event loop) hand it work through an inbox (`submit`, `abort`) and get
each request's outputs through its `RequestStream`.  The loop sleeps on a condition
while there is nothing to do, and runs steps back to back while there is: ctypes
releases the GIL inside `llama_decode`, so callers' threads run during a step.

Let the loop's thread be the only one in the process that runs llama.cpp: its CPU
backend (OpenMP builds) keeps a worker team per computing thread, and once a process
has more of those workers than cores they sleep between decodes instead of spinning,
which cost 10-20% of throughput on a 2-core machine (`benchmarks/bench_front.py`).

If a step raises (llama.cpp failed), every request that was running gets the error
from its stream, as an `EngineError`, and leaves the engine; queued requests and the
loop go on.  (A failure with no request to blame stops the loop: every stream gets
the error and `submit` raises it.)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

from llamba_cli.engine.engine import Engine, EngineStats
from llamba_cli.engine.request import Request, RequestOutput
from llamba_cli.errors import EngineError, QueueFull

__all__ = ["EngineLoop", "LoopStats", "RequestStream"]


@dataclass
class LoopStats(EngineStats):
    """The engine's counters plus the loop's queue: `queue_depth` requests accepted and
    not running yet (what `max_waiting` bounds: the inbox plus the engine's queue),
    of which `waiting` are in the engine's queue; `running` hold a slot."""

    queue_depth: int = 0
    waiting: int = 0
    running: int = 0


class RequestStream:
    """The outputs of one request, in order, ending with its finished one.

    Iterate it from a thread (blocks for each output) or with `async for` from an
    asyncio event loop (awaits each output); one consumer per stream.  Raises
    `EngineError` if the engine failed while the request ran.
    """

    def __init__(self, request: Request) -> None:
        self.request = request
        self._items: deque[RequestOutput | EngineError] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._ended = False  # the consumer has taken the last item
        self._waker: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None

    def _put(self, item: RequestOutput | EngineError) -> None:
        """From the engine thread: hand over one output (or the error that ends it)."""
        with self._cond:
            self._items.append(item)
            self._cond.notify_all()
            waker = self._waker
        if waker is not None:
            loop, event = waker
            # A closed event loop raises: its consumer is gone, nobody listens.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(event.set)

    def _take(self) -> RequestOutput | EngineError:
        item = self._items.popleft()
        if isinstance(item, EngineError) or item.finished:
            self._ended = True
        return item

    @staticmethod
    def _unwrap(item: RequestOutput | EngineError) -> RequestOutput:
        if isinstance(item, EngineError):
            raise item
        return item

    def __iter__(self) -> Iterator[RequestOutput]:
        return self

    def __next__(self) -> RequestOutput:
        with self._cond:
            while not self._items:
                if self._ended:
                    raise StopIteration
                self._cond.wait()
            item = self._take()
        return self._unwrap(item)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self

    async def __anext__(self) -> RequestOutput:
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                if self._items:
                    item = self._take()
                    break
                if self._ended:
                    raise StopAsyncIteration
                if self._waker is None or self._waker[0] is not loop:
                    self._waker = (loop, asyncio.Event())
                event = self._waker[1]
                event.clear()
            await event.wait()
        return self._unwrap(item)

    def result(self) -> Request:
        """Consume the rest of the stream (blocking) and return the finished request."""
        for _ in self:
            pass
        return self.request


class EngineLoop:
    """Owns `engine` and runs it on one background thread (see the module docstring).

    `max_waiting` bounds the requests accepted and not yet running: `submit` raises
    `QueueFull` at once beyond it.  `close()` stops the loop and closes the engine.
    """

    def __init__(self, engine: Engine, *, max_waiting: int = 1024) -> None:
        if max_waiting < 1:
            raise ValueError("max_waiting must be >= 1")
        self.engine = engine
        self.max_waiting = max_waiting
        self._cond = threading.Condition(threading.Lock())
        self._inbox: list[tuple[str, Request]] = []
        self._inbox_submits = 0
        # Each request's stream until its last output; written under `_cond`.
        self._streams: dict[Request, RequestStream] = {}
        self._snapshot = LoopStats()
        self._closing = False
        self._drain = True
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    def __enter__(self) -> EngineLoop:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._main, name="llamba-engine", daemon=True)
        self._thread.start()

    # -- any thread -------------------------------------------------------------------

    def submit(self, req: Request) -> RequestStream:
        """Queue `req`; returns the stream of its outputs. Thread-safe, never blocks.
        Raises QueueFull when `max_waiting` requests are queued, EngineError once the
        loop is closing or stopped."""
        stream = RequestStream(req)
        with self._cond:
            if self._failure is not None:
                raise EngineError(f"the engine loop stopped: {self._failure}")
            if self._closing:
                raise EngineError("the engine loop is closed")
            if self._inbox_submits + self._snapshot.waiting >= self.max_waiting:
                raise QueueFull(f"the engine's queue is full ({self.max_waiting} requests)")
            self._inbox.append(("submit", req))
            self._inbox_submits += 1
            self._streams[req] = stream
            self._cond.notify()
        return stream

    def abort(self, req: Request) -> None:
        """End `req` (queued or running) with finish_reason "abort"; its stream gets
        the finished output. Thread-safe; nothing happens if it already finished."""
        with self._cond:
            self._inbox.append(("abort", req))
            self._cond.notify()

    def stats(self) -> LoopStats:
        """Counters as of the last step, with the inbox counted in `queue_depth`."""
        with self._cond:
            snap = dataclasses.replace(self._snapshot)
            snap.queue_depth += self._inbox_submits
        return snap

    def close(self, drain: bool = True) -> None:
        """Stop accepting requests; with `drain`, finish every accepted request first,
        else abort them (their streams end with finish_reason "abort").  Then stop the
        thread and close the engine."""
        with self._cond:
            self._closing = True
            self._drain = self._drain and drain
            thread = self._thread
            self._cond.notify()
        if thread is not None:
            thread.join()
        else:  # never started: end what was submitted
            self._drain = False
            self._main()
        self.engine.close()

    # -- the engine thread ------------------------------------------------------------

    def _main(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not (self._inbox or engine.has_work or self._closing):
                    self._cond.wait()
                inbox, self._inbox = self._inbox, []
                # Until the step's snapshot, count the moved requests as waiting.
                self._snapshot.waiting += self._inbox_submits
                self._snapshot.queue_depth += self._inbox_submits
                self._inbox_submits = 0
                stop_now = self._closing and not self._drain
            for kind, req in inbox:
                if kind == "abort":
                    engine.abort(req)
                    continue
                try:
                    engine.submit(req)
                except Exception as e:  # e.g. a prompt that is not text: this request only
                    self._end_stream(req, _engine_error(e, "cannot queue the request"))
            if stop_now:
                for req in [*engine.scheduler.running, *engine.scheduler.waiting]:
                    engine.abort(req)
            if engine.has_work and not self._step():
                return
            with self._cond:
                self._snapshot = self._snapshot_now()
                if self._closing and not self._inbox and not engine.has_work:
                    return

    def _step(self) -> bool:
        """One engine step, its outputs handed to their streams. False when the engine
        failed with no request to blame: the loop stops, and every stream gets the error."""
        engine = self.engine
        try:
            outs = engine.step()
        except Exception as e:
            error = _engine_error(e, "engine step failed")
            sched = engine.scheduler
            # The running requests were in the failed batch; with none, the queue's.
            failed = list(sched.running) or list(sched.waiting)
            for req in failed:
                engine.abort(req)  # frees its KV; its "abort" output finds no stream
                self._end_stream(req, error)
            if not failed:
                with self._cond:
                    self._failure = error
                    pending = list(self._streams)
                for req in pending:
                    self._end_stream(req, error)
                return False
            return True
        for out in outs:
            if out.finished:
                self._end_stream(out.request, out)
            else:
                stream = self._streams.get(out.request)
                if stream is not None:
                    stream._put(out)
        return True

    def _end_stream(self, req: Request, last: RequestOutput | EngineError) -> None:
        with self._cond:
            stream = self._streams.pop(req, None)
        if stream is not None:
            stream._put(last)

    def _snapshot_now(self) -> LoopStats:
        sched = self.engine.scheduler
        counters = dataclasses.asdict(self.engine.stats)
        n = len(sched.waiting)
        return LoopStats(**counters, queue_depth=n, waiting=n, running=len(sched.running))


def _engine_error(e: Exception, what: str) -> EngineError:
    return e if isinstance(e, EngineError) else EngineError(f"{what}: {e!r}")
