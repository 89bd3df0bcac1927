"""Request bodies of the OpenAI-compatible endpoints, validated once.

Field names, types and ranges follow OpenAI's API; llama.cpp's and vLLM's sampling
extras (`top_k`, `min_p`, `repeat_penalty` / `repetition_penalty`, `repeat_last_n`,
`ignore_eos`, `grammar`, a top-level `json_schema`) are accepted where they map onto
llamba's engine.  Unknown fields are ignored, as OpenAI-compatible servers do;
a known field with a wrong type or value is refused (strict types: `"1"` is not a
number, `true` is not an integer).  `parse` turns pydantic's errors into one
`InvalidRequest` naming the field.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from llamba_cli.openai.errors import InvalidRequest

MAX_N = 128  # choices per request: each is a sequence in the batch
MAX_LOGPROBS = 20  # top alternatives per token, as OpenAI's chat API allows

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Tags pydantic adds to an error's location inside a union; not field names.
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _check_stop(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise PydanticCustomError("type", "expected a string or a list of strings")


Stop = Annotated[str | list[str] | None, BeforeValidator(_check_stop)]


def _check_prompt(value: Any) -> Any:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    if isinstance(value, list) and value and all(isinstance(v, int | list) for v in value):
        raise PydanticCustomError(
            "unsupported", "token-id prompts are not supported; send the prompt as text"
        )
    raise PydanticCustomError("type", "expected a string or a non-empty list of strings")


Prompt = Annotated[str | list[str], BeforeValidator(_check_prompt)]


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True, frozen=True)


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchemaSpec(_Body):
    """`response_format.json_schema`: OpenAI's wrapper around the schema itself."""

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and (
            self.json_schema is None or self.json_schema.schema_ is None
        ):
            raise PydanticCustomError(
                "missing", "type 'json_schema' needs json_schema.schema (a JSON Schema object)"
            )
        return self


class TextPart(_Body):
    type: Literal["text"]
    text: str


def _check_parts(value: Any) -> Any:
    if isinstance(value, list):
        for part in value:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise PydanticCustomError(
                    "unsupported", f"only text content parts are supported, got {kind!r}"
                )
    return value


class ChatMessage(_Body):
    """One message; `developer` is read as `system`, content parts must be text."""

    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str | list[TextPart], BeforeValidator(_check_parts)]
    name: str | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)

    def as_dict(self) -> dict[str, str]:
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": self.text}


class SamplingBody(_Body):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: Stop = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    # llama.cpp / vLLM extras
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, lt=1)
    repeat_penalty: float | None = Field(
        default=None, gt=0, validation_alias=AliasChoices("repeat_penalty", "repetition_penalty")
    )
    repeat_last_n: int | None = Field(default=None, ge=0)
    ignore_eos: bool = False
    grammar: str | None = None
    json_schema: dict[str, Any] | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionBody(SamplingBody):
    """`POST /v1/completions`: raw prompt text, no chat template."""

    prompt: Prompt
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(default=None, ge=1)
    suffix: str | None = None

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value != info.data.get("n", 1):
            raise PydanticCustomError("unsupported", "best_of other than n is not supported")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise PydanticCustomError("unsupported", "suffix (insertion) is not supported")
        return value


class ChatBody(SamplingBody):
    """`POST /v1/chat/completions`: messages rendered through the prompt format."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise PydanticCustomError("invalid", "top_logprobs needs logprobs set to true")
        return value

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            raise PydanticCustomError("unsupported", "tools (function calling) are not supported")
        return value


class ClassifyBody(_Body):
    """`POST /v1/classify`: a prompt (as is) or messages (through the prompt format),
    and the labels to score as its continuation."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    labels: list[str] = Field(min_length=2)
    label_delimiter: str = " "

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, value: str | None) -> str | None:
        if value == "":
            raise PydanticCustomError("invalid", "the prompt must not be empty")
        return value

    @field_validator("labels")
    @classmethod
    def _distinct_labels(cls, value: list[str]) -> list[str]:
        if any(not label.strip() for label in value):
            raise PydanticCustomError("invalid", "labels must not be empty or whitespace")
        if len(set(value)) != len(value):
            raise PydanticCustomError("invalid", "labels must be distinct")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ClassifyBody:
        if (self.prompt is None) == (self.messages is None):
            # Not a ValueError: pydantic passes it through with its `param`.
            raise InvalidRequest("give either prompt or messages", param="prompt")
        return self


B = TypeVar("B", bound=_Body)


def parse(model: type[B], body: Any) -> B:
    """Validate a decoded JSON body; `InvalidRequest` (one line, with `param`) if invalid."""
    if not isinstance(body, dict):
        raise InvalidRequest(f"the request body must be a JSON object, got {_json_type(body)}")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        error = e.errors(include_url=False)[0]
        param = _param(error["loc"])
        where = f"{param}: " if param else ""
        raise InvalidRequest(f"{where}{error['msg']}", param=param) from None


def _param(loc: tuple[Any, ...]) -> str | None:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif isinstance(item, str) and _IDENT.fullmatch(item) and item not in _TYPE_TAGS:
            if item == "schema_":
                item = "schema"
            parts.append(f".{item}" if parts else item)
        else:
            break
    return "".join(parts) or None


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    return "a number" if isinstance(value, int | float) else type(value).__name__
