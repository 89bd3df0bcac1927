"""The generation endpoints: body -> `Call` -> engine loop -> JSON or server-sent events.

Every request joins the running batch at the engine's next step.  A full wait queue
answers 429 at once; a client that disconnects, streaming or not, has its requests
aborted (slot and KV freed at the next step).  Errors are answered in OpenAI's shape
and never reach the server: a bad body is a 400, a llama.cpp failure a 500 for the
requests it hit.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response

from llamba_cli.engine import EngineLoop, RequestOutput, RequestStream
from llamba_cli.errors import EngineError, QueueFull
from llamba_cli.openai import ApiError, Call, InvalidRequest, OpenAIApi, RequestFailed
from llamba_cli.server.runtime import Runtime
from llamba_cli.server.streaming import DONE, Disconnected, EventStream, merge, race_disconnect, sse

RETRY_AFTER_SECONDS = 1


class Unavailable(ApiError):
    status = 503
    type = "unavailable_error"


class Overloaded(ApiError):
    status = 429
    type = "rate_limit_error"


class Unauthorized(ApiError):
    status = 401
    type = "invalid_request_error"


def error_response(error: ApiError) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if error.status == 429 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def ready(runtime: Runtime) -> tuple[OpenAIApi, EngineLoop]:
    api, loop = runtime.api, runtime.loop
    if not runtime.ready or api is None or loop is None:
        if runtime.state == "loading":
            raise Unavailable("the model is still loading; retry shortly", code="loading")
        raise Unavailable(f"the server is {runtime.state}", code=runtime.state)
    return api, loop


def parse_json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise InvalidRequest(f"the request body is not valid JSON: {e}") from None


class Generation:
    """One HTTP request to a generation endpoint, from body to last byte."""

    def __init__(self, runtime: Runtime, route: str, request: HttpRequest) -> None:
        self.runtime = runtime
        self.metrics = runtime.metrics
        self.route = route
        self.request = request
        self.t0 = time.perf_counter()
        self.call: Call | None = None
        self.loop: EngineLoop | None = None

    async def respond(self) -> Response:
        try:
            api, self.loop = ready(self.runtime)
            body = parse_json(await self.request.body())
            self.call = api.call(self.route, body)
            streams = self._submit(self.call, self.loop)
            if self.call.stream:
                return await self._stream(self.call, streams)
            return await self._whole(self.call, streams)
        except ApiError as e:
            self._abort()
            return self._answer(error_response(e))
        except Disconnected:
            self._abort()
            self.metrics.disconnected += 1
            return self._answer(Response(status_code=499))
        except BaseException:
            self._abort()
            raise

    def _answer(self, response: Response) -> Response:
        self.metrics.answered(self.route, response.status_code)
        return response

    def _submit(self, call: Call, loop: EngineLoop) -> list[RequestStream]:
        streams = []
        try:
            for req in call.requests:
                streams.append(loop.submit(req))
        except QueueFull as e:
            self.metrics.rejected += 1
            raise Overloaded(
                f"the server is busy: {e}; retry in {RETRY_AFTER_SECONDS}s",
                code="rate_limit_exceeded",
            ) from None
        except EngineError as e:  # the loop stopped (llama.cpp failed) or is closing
            if self.runtime.ready:
                self.runtime.engine_failed(str(e))
            raise Unavailable(f"the engine is not running: {e}", code=self.runtime.state) from None
        return streams

    def _abort(self) -> None:
        """Abort this call's unfinished requests (their slots free at the next step)."""
        if self.call is None or self.loop is None:
            return
        for req in self.call.requests:
            if not req.finished:
                self.loop.abort(req)

    async def _whole(self, call: Call, streams: list[RequestStream]) -> Response:
        async def run() -> None:
            async for _ in merge(streams):
                pass

        try:
            await race_disconnect(self.request, run())
        except EngineError as e:
            raise self._engine_failed(e) from None
        body = call.response()
        self.metrics.latency.observe(time.perf_counter() - self.t0)
        return self._answer(JSONResponse(body))

    def _engine_failed(self, e: EngineError) -> RequestFailed:
        self.runtime.log(f"llama.cpp failed on a request: {e}")
        return RequestFailed(f"llama.cpp failed: {e}")

    async def _stream(self, call: Call, streams: list[RequestStream]) -> Response:
        outputs = merge(streams)
        # The first output decides the status: a request that cannot start (prompt
        # too long, a grammar llama.cpp rejects) is a 400, not an event in a 200.
        try:
            first: RequestOutput = await race_disconnect(self.request, anext(outputs))
        except EngineError as e:
            raise self._engine_failed(e) from None
        head = call.stream_chunks(first)
        self.metrics.ttft.observe(time.perf_counter() - self.t0)
        response = EventStream(self._events(call, head, outputs), on_close=self._closed)
        self.metrics.answered(self.route, 200)
        return response

    async def _events(
        self, call: Call, head: list[dict[str, Any]], outputs: AsyncIterator[RequestOutput]
    ) -> AsyncIterator[bytes]:
        try:
            for chunk in [*call.stream_start(), *head]:
                yield sse(chunk)
            async for out in outputs:
                for chunk in call.stream_chunks(out):
                    yield sse(chunk)
            for chunk in call.stream_end():
                yield sse(chunk)
            yield DONE
        except ApiError as e:
            yield sse(e.body())
        except EngineError as e:
            yield sse(self._engine_failed(e).body())

    def _closed(self, disconnected: bool) -> None:
        if disconnected:
            self.metrics.disconnected += 1
        else:
            self.metrics.latency.observe(time.perf_counter() - self.t0)
        self._abort()
