"""Async plumbing between the engine loop's streams and HTTP responses.

- `merge` interleaves the outputs of a call's n streams as they arrive.
- `race_disconnect` awaits a result while watching the client: a client that goes away
  before the result is ready is noticed at once, not when the answer is written.
- `EventStream` is a server-sent-events response that does the same while streaming:
  it stops at the client's disconnect and runs `on_close` in every case, so the
  caller aborts whatever the engine still runs for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import anyio
import orjson
from starlette.requests import Request as HttpRequest
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

T = TypeVar("T")

DONE = b"data: [DONE]\n\n"
_END = object()


def sse(payload: Any) -> bytes:
    """One server-sent event carrying `payload` as JSON."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"


async def merge(streams: Sequence[AsyncIterator[T]]) -> AsyncIterator[T]:
    """Items of all `streams` in arrival order; an exception in one is raised here."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield item
        return
    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def pump(stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                queue.put_nowait(item)
        except Exception as e:
            queue.put_nowait(e)
        finally:
            queue.put_nowait(_END)

    tasks = [asyncio.ensure_future(pump(s)) for s in streams]
    try:
        open_streams = len(tasks)
        while open_streams:
            item = await queue.get()
            if item is _END:
                open_streams -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()


async def wait_disconnect(receive: Callable[[], Awaitable[Any]]) -> None:
    """Return when the client disconnects (the request body must have been read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class Disconnected(Exception):
    """The client went away before its answer was ready."""


async def race_disconnect(request: HttpRequest, work: Awaitable[T]) -> T:
    """The result of `work`, or `Disconnected` as soon as the client goes away
    (then `work` is cancelled)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(wait_disconnect(request.receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if task.done():
        return task.result()
    task.cancel()
    raise Disconnected


class EventStream(StreamingResponse):
    """`text/event-stream` that watches for the client's disconnect the whole time
    (Starlette's own only notices it when a write fails) and always ends with
    `on_close(disconnected)`."""

    media_type = "text/event-stream"

    def __init__(
        self,
        content: AsyncIterator[bytes],
        on_close: Callable[[bool], None],
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(
            content,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})},
        )
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        completed = False
        try:
            async with anyio.create_task_group() as tg:

                async def stream() -> None:
                    nonlocal completed
                    try:
                        await self.stream_response(send)
                        completed = True
                    except OSError:  # the client went away mid-write
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await wait_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()
            self.on_close(not completed)
