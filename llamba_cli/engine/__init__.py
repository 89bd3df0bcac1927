"""The llamba engine: continuous batching over llama.cpp, as a plain Python library.

Needs neither the CLI nor files: build an `Engine`, submit `Request`s (or pass an
iterable to `Engine.run`) and collect them as they finish, or step it yourself and
read each step's `RequestOutput`s (new tokens, text, logprobs).  `EngineLoop` runs an
engine on a thread of its own for callers on any thread or an asyncio loop.

Names load on first use: `from llamba_cli.engine import EngineConfig` imports only
the configuration, not numpy or llama.cpp, so a command line that only parses its
options (`llamba --help`) starts in a fraction of the time.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llamba_cli.engine.config import EngineConfig, SamplingParams
    from llamba_cli.engine.engine import Engine, EngineStats
    from llamba_cli.engine.front import EngineLoop, LoopStats, RequestStream
    from llamba_cli.engine.grammar import (
        Grammar,
        grammar_vocab_tables,
        schema_to_gbnf,
        use_grammar_vocab_tables,
    )
    from llamba_cli.engine.labels import normalize
    from llamba_cli.engine.llama import Model, check_gguf
    from llamba_cli.engine.request import Request, RequestOutput, Status, TokenLogprob

# Public name -> the module that defines it.
_WHERE = {
    "Engine": "engine",
    "EngineConfig": "config",
    "EngineLoop": "front",
    "EngineStats": "engine",
    "Grammar": "grammar",
    "LoopStats": "front",
    "Model": "llama",
    "Request": "request",
    "RequestOutput": "request",
    "RequestStream": "front",
    "SamplingParams": "config",
    "Status": "request",
    "TokenLogprob": "request",
    "check_gguf": "llama",
    "normalize": "labels",
    "grammar_vocab_tables": "grammar",
    "schema_to_gbnf": "grammar",
    "use_grammar_vocab_tables": "grammar",
}

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineLoop",
    "EngineStats",
    "Grammar",
    "LoopStats",
    "Model",
    "Request",
    "RequestOutput",
    "RequestStream",
    "SamplingParams",
    "Status",
    "TokenLogprob",
    "check_gguf",
    "grammar_vocab_tables",
    "normalize",
    "schema_to_gbnf",
    "use_grammar_vocab_tables",
]
assert sorted(__all__) == sorted(_WHERE)


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{where}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | _WHERE.keys())
