"""`llamba serve`: the engine behind an OpenAI-compatible HTTP server, with a page to try it.

`serve(ServerConfig(...))` binds, loads the model and serves until SIGTERM; the
FastAPI app (`create_app`) is built on the protocol layer in `llamba_cli.openai`
and the engine loop in `llamba_cli.engine`.
"""

from llamba_cli.server.app import create_app
from llamba_cli.server.config import ServerConfig, is_loopback
from llamba_cli.server.runtime import Runtime
from llamba_cli.server.serve import serve

__all__ = ["Runtime", "ServerConfig", "create_app", "is_loopback", "serve"]
