"""`ServerConfig`: how `llamba serve` listens, authenticates and runs its engine."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from llamba_cli.engine import EngineConfig
from llamba_cli.errors import ConfigError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServerConfig:
    """`engine` is the engine the model runs in; `format_name` the prompt format of
    chat messages ("auto": the model's chat template, else plain); `model_name` what
    responses call the model (default: the model file's stem).  `max_queue` bounds
    the requests waiting for a slot: beyond it a request is answered 429 at once.
    Without `api_key` the server binds only a loopback address unless `insecure`.
    `drain_seconds` is how long SIGTERM waits for running requests before aborting them."""

    engine: EngineConfig
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_key: str | None = None
    insecure: bool = False
    max_queue: int = 256
    format_name: str = "auto"
    model_name: str | None = None
    drain_seconds: float = 30.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be between 0 and 65535, got {self.port}")
        if self.max_queue < 1:
            raise ConfigError(f"max-queue must be >= 1, got {self.max_queue}")
        if self.drain_seconds < 0:
            raise ConfigError(f"drain-seconds must be >= 0, got {self.drain_seconds}")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("the API key is empty")
        if self.api_key is None and not self.insecure and not is_loopback(self.host):
            raise ConfigError(
                f"refusing to serve on {self.host} without an API key: give --api-key or "
                "--api-key-file, or --insecure to serve without one"
            )
