"""Errors answered in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

A server turns each into its HTTP status; a batch run writes the same body into the
output line's `error`.  `InvalidRequest` is the client's fault (400) and, being a
`ConfigError`, reads as one line anywhere else in llamba.
"""

from __future__ import annotations

from typing import Any

from llamba_cli.errors import ConfigError, LlambaError


class ApiError(LlambaError):
    """A request that cannot be answered with a result: an HTTP status and an error body."""

    status = 500
    type = "server_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        if status is not None:
            self.status = status

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, param=self.param, code=self.code)


class InvalidRequest(ApiError, ConfigError):
    """The request body is invalid; `param` names the offending field (dotted path)."""

    status = 400
    type = "invalid_request_error"


class RequestFailed(ApiError):
    """The engine could not complete a valid request (llama.cpp failed, or it was aborted)."""


def error_body(
    message: str, type: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
