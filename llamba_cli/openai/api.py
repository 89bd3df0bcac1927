"""`OpenAIApi`: request bodies in, engine requests and response bodies out.

One object per served model, shared by every request; it holds nothing that a call
changes, so the server's handlers and a batch run may use it from any thread.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from llamba_cli.job.prompts import PromptBuilder, PromptSpec
from llamba_cli.openai.calls import Call, ChatCall, ClassifyCall, CompletionCall
from llamba_cli.openai.errors import InvalidRequest
from llamba_cli.openai.schemas import ChatBody, ClassifyBody, CompletionBody, parse
from llamba_cli.openai.served import ServedModel

COMPLETIONS = "/v1/completions"
CHAT_COMPLETIONS = "/v1/chat/completions"
CLASSIFY = "/v1/classify"
ROUTES = (CHAT_COMPLETIONS, COMPLETIONS, CLASSIFY)


class OpenAIApi:
    """Maps bodies of `ROUTES` to `Call`s for one `ServedModel`.

    The prompt format is compiled and checked once, here: a format that cannot render
    a conversation raises `TemplateError` before anything is served."""

    def __init__(self, served: ServedModel) -> None:
        self.served = served
        self.builder = PromptBuilder(
            PromptSpec(),
            served.prompt_format,
            bos_token=served.bos_token,
            eos_token=served.eos_token,
        )

    def call(
        self, route: str, body: Any, *, call_id: str | None = None, created: int | None = None
    ) -> Call:
        """The call for `body` sent to `route`. `call_id` and `created` default to a fresh
        random id and the current time (a batch run passes its own). Raises
        `InvalidRequest` (with `param`) for an unknown route or an invalid body."""
        cid = call_id or uuid.uuid4().hex
        when = int(time.time()) if created is None else created
        if route == COMPLETIONS:
            return CompletionCall(
                self.served, parse(CompletionBody, body), call_id=cid, created=when
            )
        if route == CHAT_COMPLETIONS:
            return ChatCall(
                self.served, self.builder, parse(ChatBody, body), call_id=cid, created=when
            )
        if route == CLASSIFY:
            return ClassifyCall(
                self.served, self.builder, parse(ClassifyBody, body), call_id=cid, created=when
            )
        raise InvalidRequest(
            f"unknown url {route!r} (expected one of {', '.join(ROUTES)})", param="url"
        )

    def models(self) -> dict[str, Any]:
        """The body of `GET /v1/models`."""
        return {
            "object": "list",
            "data": [
                {
                    "id": self.served.name,
                    "object": "model",
                    "created": self.served.created,
                    "owned_by": "llamba",
                }
            ],
        }
