"""`llamba serve`: the OpenAI-compatible server, as a command.

Takes the model, prompt-format and engine options of the job commands (passed in by
`register` from the shared option table, so they read the same everywhere) plus
its own: where to listen, the API key, the wait queue.  Prints the URL on stdout
once the socket is bound; logs go to stderr.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from llamba_cli.cli import preload
from llamba_cli.engine import EngineConfig
from llamba_cli.errors import ConfigError
from llamba_cli.job.models import resolve_model_path

# Options shared with the job commands (keys of the CLI's option table).
SHARED = (
    "model",
    "format",
    "slots",
    "ctx",
    "n_batch",
    "threads",
    "flash_attn",
    "n_gpu_layers",
    "prefix_cache",
)

_PANEL = "Server"
OWN: dict[str, tuple[Any, Any, Any]] = {
    "host": (
        str,
        "127.0.0.1",
        typer.Option("--host", help="Address to listen on.", rich_help_panel=_PANEL),
    ),
    "port": (
        int,
        8080,
        typer.Option("--port", help="Port (0: any free port).", rich_help_panel=_PANEL),
    ),
    "api_key": (
        str | None,
        None,
        typer.Option(
            "--api-key",
            help="Require 'Authorization: Bearer KEY' on every endpoint but /health and /.",
            rich_help_panel=_PANEL,
        ),
    ),
    "api_key_file": (
        str | None,
        None,
        typer.Option(
            "--api-key-file", help="Read the API key from this file.", rich_help_panel=_PANEL
        ),
    ),
    "insecure": (
        bool,
        False,
        typer.Option(
            "--insecure",
            help="Allow a non-loopback --host without an API key.",
            rich_help_panel=_PANEL,
        ),
    ),
    "max_queue": (
        int,
        256,
        typer.Option(
            "--max-queue",
            help="Requests that may wait for a slot; beyond, 429 at once.",
            rich_help_panel=_PANEL,
        ),
    ),
    "model_name": (
        str | None,
        None,
        typer.Option(
            "--model-name",
            help="Model name in responses and /v1/models (default: the file's stem).",
            rich_help_panel=_PANEL,
        ),
    ),
    "drain_seconds": (
        float,
        30.0,
        typer.Option(
            "--drain-seconds",
            help="On SIGTERM, wait this long for running requests, then abort them.",
            rich_help_panel=_PANEL,
        ),
    ),
}


def register(app: typer.Typer, options: Mapping[str, tuple[Any, Any]]) -> None:
    """Add `serve` to `app`, with the shared options taken from `options`."""

    def serve_command(**kwargs: Any) -> None:
        code = run_serve(kwargs)
        raise typer.Exit(code)

    shared = [(key, options[key][0], None, options[key][1]) for key in SHARED]
    own = [(key, *spec) for key, spec in OWN.items()]
    params = [
        inspect.Parameter(
            key,
            inspect.Parameter.KEYWORD_ONLY,
            default=default,
            annotation=Annotated[annotation, option],
        )
        for key, annotation, default, option in shared + own
    ]
    serve_command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    serve_command.__doc__ = (
        "Serve the model over HTTP: OpenAI-compatible completions and chat, classify, "
        "a page to try it at /."
    )
    app.command("serve")(serve_command)


def read_api_key(path: str) -> str:
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"cannot read --api-key-file {path}: {getattr(e, 'strerror', None) or e}"
        ) from None
    key = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not key:
        raise ConfigError(f"--api-key-file {path} is empty")
    return key


def build_config(values: Mapping[str, Any]) -> Any:
    """The ServerConfig for the command's option values (None: not given)."""
    from llamba_cli.server import ServerConfig

    if values.get("api_key") and values.get("api_key_file"):
        raise ConfigError("give either --api-key or --api-key-file, not both")
    api_key = values.get("api_key")
    if values.get("api_key_file"):
        api_key = read_api_key(values["api_key_file"])
    engine: dict[str, Any] = {}
    for key, field in (
        ("slots", "slots"),
        ("ctx", "n_ctx_seq"),
        ("n_batch", "n_batch"),
        ("threads", "n_threads"),
        ("flash_attn", "flash_attn"),
        ("n_gpu_layers", "n_gpu_layers"),
        ("prefix_cache", "prefix_cache"),
    ):
        if values.get(key) is not None:
            engine[field] = values[key]
    server = ServerConfig(
        engine=EngineConfig(model_path="", **engine),
        host=values.get("host") or "127.0.0.1",
        port=values.get("port", 8080),
        api_key=api_key,
        insecure=bool(values.get("insecure")),
        max_queue=values.get("max_queue", 256),
        format_name=values.get("format") or "auto",
        model_name=values.get("model_name"),
        drain_seconds=values.get("drain_seconds", 30.0),
    )
    # The model is resolved last: a bad flag is reported before the embedded model
    # is assembled, and a missing file before anything binds.
    model_path = str(resolve_model_path(values.get("model")))
    return replace(server, engine=replace(server.engine, model_path=model_path))


def run_serve(values: Mapping[str, Any]) -> int:
    from llamba_cli.server import serve

    config = build_config(values)
    engine = config.engine
    model = preload.take(
        values.get("model"), n_gpu_layers=engine.n_gpu_layers, repack=engine.repack
    )

    def log(message: str) -> None:
        print(f"llamba: {message}", file=sys.stderr, flush=True)

    def announce(url: str) -> None:
        print(url, flush=True)
        log(f"listening on {url} (loading the model; /health answers 503 until it is ready)")

    code = serve(config, log=log, announce=announce, model=model)
    log("stopped")
    return code
