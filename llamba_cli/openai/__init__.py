"""OpenAI's request and response shapes over llamba's engine, without HTTP.

`OpenAIApi(served).call(route, body)` validates a request body of
`/v1/completions`, `/v1/chat/completions` or llamba's `/v1/classify` and returns a
`Call`: its engine `Request`s, and the response body (or streaming chunks) built
from them once they run.  `llamba serve` puts it behind HTTP; a batch run can feed
the same bodies from a file and get the same response bodies (ids and times aside).
"""

from llamba_cli.openai.api import CHAT_COMPLETIONS, CLASSIFY, COMPLETIONS, ROUTES, OpenAIApi
from llamba_cli.openai.calls import Call, ChatCall, ClassifyCall, CompletionCall
from llamba_cli.openai.errors import ApiError, InvalidRequest, RequestFailed, error_body
from llamba_cli.openai.served import ServedModel, prompt_format, served_model

__all__ = [
    "CHAT_COMPLETIONS",
    "CLASSIFY",
    "COMPLETIONS",
    "ROUTES",
    "ApiError",
    "Call",
    "ChatCall",
    "ClassifyCall",
    "CompletionCall",
    "InvalidRequest",
    "OpenAIApi",
    "RequestFailed",
    "ServedModel",
    "error_body",
    "prompt_format",
    "served_model",
]
