"""`ServedModel`: what the protocol layer needs to know about the model it serves.

Built once from the loaded engine `Model` (its name, vocabulary size, chat template
and special tokens), so mapping a request body never calls into llama.cpp.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from llamba_cli.engine import Model
from llamba_cli.errors import ConfigError
from llamba_cli.job.formats import PromptFormat, format_from_gguf, load_format


@dataclass(frozen=True)
class ServedModel:
    """The model behind the endpoints.

    `name` is what responses and `/v1/models` report; `prompt_format` renders chat
    messages (and its stop strings end chat completions); `n_ctx_seq` is the most
    tokens a sequence holds, prompt and completion together.
    """

    name: str
    prompt_format: PromptFormat
    n_vocab: int
    n_ctx_seq: int
    bos_token: str = ""
    eos_token: str = ""
    created: int = field(default_factory=lambda: int(time.time()))


def prompt_format(model: Model, name: str = "auto") -> PromptFormat:
    """The format named `name` ("auto": the model's own chat template, else `plain`;
    "gguf": the model's template or ConfigError; else a packaged name or a .toml path)."""
    if name in ("auto", "gguf"):
        template = model.chat_template
        if template:
            return format_from_gguf(template)
        if name == "gguf":
            raise ConfigError("--format gguf: this model file has no chat template")
        return load_format("plain")
    return load_format(name)


def served_model(
    model: Model, *, n_ctx_seq: int, format_name: str = "auto", name: str | None = None
) -> ServedModel:
    """A `ServedModel` for a loaded engine model; `name` defaults to the file's stem."""
    return ServedModel(
        name=name or model.path.stem,
        prompt_format=prompt_format(model, format_name),
        n_vocab=model.n_vocab,
        n_ctx_seq=n_ctx_seq,
        bos_token=model.token_text(model.bos),
        eos_token=model.token_text(model.eos),
    )
