"""Running the server: bind, announce the URL, serve until SIGTERM/SIGINT, drain, exit.

The socket is bound before the model loads, so the URL (with the real port when
`port` is 0) is known at once and `/health` answers 503 until the model is ready.
On SIGTERM or SIGINT the server stops accepting connections, lets running requests
finish for up to `drain_seconds`, aborts the rest, frees the engine and returns.
A second SIGINT stops at once.
"""

from __future__ import annotations

import contextlib
import signal
import socket
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import uvicorn

from llamba_cli.errors import ConfigError
from llamba_cli.server.app import create_app
from llamba_cli.server.config import ServerConfig
from llamba_cli.server.runtime import Runtime

if TYPE_CHECKING:
    from llamba_cli.job.models import ModelLoad


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); ConfigError (one line) if it cannot be had."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"cannot resolve host {host!r}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


@contextlib.contextmanager
def _quiet_signals() -> Iterator[None]:
    """Uvicorn re-raises the signal that stopped it once it is done; make that a no-op,
    so a drained server returns normally instead of dying by the signal."""
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve(
    config: ServerConfig,
    *,
    log: Callable[[str], None],
    announce: Callable[[str], None],
    model: ModelLoad | None = None,
) -> int:
    """Serve until stopped; returns the exit code (0 after a clean shutdown, 2 when the
    model could not load, 3 when llama.cpp failed for good).  `model`: the configured
    model, already loading (else the server loads it once bound)."""
    sock = bind(config.host, config.port)
    server: uvicorn.Server | None = None

    def stop() -> None:
        if server is not None:
            server.should_exit = True

    runtime = Runtime(config, log=log, stop_server=stop, model=model)
    app = create_app(runtime)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=int(config.drain_seconds),
        )
    )
    announce(url_of(sock))
    try:
        with _quiet_signals():
            server.run(sockets=[sock])
    finally:
        runtime.close()
        sock.close()
    return runtime.exit_code
