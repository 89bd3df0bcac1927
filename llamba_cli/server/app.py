"""The FastAPI application of `llamba serve`.

    GET  /                     the page for trying the model (no key needed: it holds no data)
    GET  /health               200 once the model is loaded, 503 before (never needs a key)
    GET  /metrics              Prometheus text
    GET  /v1/models
    POST /v1/completions
    POST /v1/chat/completions
    POST /v1/classify          llamba's own: label probabilities

With an API key, every endpoint but `/health` and the page needs
`Authorization: Bearer KEY` (compared in constant time).
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Request
from starlette.exceptions import HTTPException
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

from llamba_cli.openai import CHAT_COMPLETIONS, CLASSIFY, COMPLETIONS, ApiError, error_body
from llamba_cli.server.handlers import Generation, Unauthorized, error_response, ready
from llamba_cli.server.runtime import Runtime

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


def page() -> str:
    return resources.files("llamba_cli.server").joinpath("static/index.html").read_text("utf-8")


def bearer_check(api_key: str | None) -> Callable[[Request], None]:
    expected = f"Bearer {api_key}".encode() if api_key else None

    def check(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise Unauthorized(
                "a valid API key is needed: send 'Authorization: Bearer KEY'",
                code="invalid_api_key",
            )

    return check


def create_app(runtime: Runtime) -> FastAPI:
    """The app over `runtime`: its lifespan starts loading the model and, at shutdown
    (after the server stopped accepting and drained), aborts what is left and frees it."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        runtime.start_loading()
        try:
            yield
        finally:
            runtime.close()

    app = FastAPI(
        title="llamba",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    auth = [Depends(bearer_check(runtime.config.api_key))]
    html = page()

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        runtime.metrics.answered(request.url.path, exc.status)
        return error_response(exc)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        # A bug: the request gets a 500 in OpenAI's shape, the server goes on.
        runtime.log(f"internal error on {request.url.path}: {type(exc).__name__}: {exc}")
        runtime.metrics.answered(request.url.path, 500)
        body = error_body(f"internal error: {type(exc).__name__}", "server_error")
        return JSONResponse(body, status_code=500)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        runtime.metrics.answered(
            request.url.path if exc.status_code != 404 else "other", exc.status_code
        )
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(error_body(message, kind), status_code=exc.status_code)

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return HTMLResponse(html)

    @app.get("/health")
    async def health() -> Response:
        if runtime.ready:
            return JSONResponse({"status": "ok"})
        body: dict[str, Any] = {"status": runtime.state}
        body.update(
            error_body(runtime.error or f"the server is {runtime.state}", "unavailable_error")
        )
        return JSONResponse(body, status_code=503)

    @app.get("/metrics", dependencies=auth)
    async def metrics() -> Response:
        return PlainTextResponse(
            runtime.metrics.render(runtime.stats()), media_type=PROMETHEUS_TEXT
        )

    @app.get("/v1/models", dependencies=auth)
    async def models() -> Response:
        api, _ = ready(runtime)
        return JSONResponse(api.models())

    for route in (COMPLETIONS, CHAT_COMPLETIONS, CLASSIFY):
        app.add_api_route(route, _endpoint(runtime, route), methods=["POST"], dependencies=auth)
    return app


def _endpoint(runtime: Runtime, route: str) -> Callable[[Request], Any]:
    async def endpoint(request: Request) -> Response:
        return await Generation(runtime, route, request).respond()

    endpoint.__name__ = route.strip("/").replace("/", "_")
    return endpoint
