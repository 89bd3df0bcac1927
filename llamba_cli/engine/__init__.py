"""The llamba engine: continuous batching over llama.cpp, as a plain Python library.

Needs neither the CLI nor files: build an `Engine`, submit `Request`s (or pass an
iterable to `Engine.run`) and collect them as they finish, or step it yourself and
read each step's `RequestOutput`s (new tokens, text, logprobs).  `EngineLoop` runs an
engine on a thread of its own for callers on any thread or an asyncio loop.
"""

from llamba_cli.engine.config import EngineConfig, SamplingParams
from llamba_cli.engine.engine import Engine, EngineStats
from llamba_cli.engine.front import EngineLoop, LoopStats, RequestStream
from llamba_cli.engine.grammar import Grammar, schema_to_gbnf
from llamba_cli.engine.labels import normalize
from llamba_cli.engine.llama import Model, check_gguf
from llamba_cli.engine.request import Request, RequestOutput, Status, TokenLogprob

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
    "normalize",
    "schema_to_gbnf",
]
