"""The builder that turns one input row into prompt text.

`PromptBuilder` takes the user content of a row (`--template`, else the prompt
column, else the messages column), makes it a conversation, adds the `--system`
message, and renders it through a prompt format (`job.formats`).

Every template is rendered in a bounded Jinja sandbox (`job.sandbox`): reaching for
an unsafe attribute (`__class__`, `__globals__`, ...) raises at once, and what a
render may build, output and loop over is bounded, since a chat template read from a
model file is untrusted input.

Messages follow OpenAI's shape: roles `system`, `developer` (taken as `system`),
`user`, `assistant` and `tool`; `content` a string, or a list of text parts
(`{"type": "text", "text": ...}`) joined with newlines.
"""

from __future__ import annotations

import numbers
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jinja2
import orjson
from jinja2.exceptions import SecurityError

from llamba_cli.errors import ConfigError, RowError, TemplateError
from llamba_cli.job.formats import PromptFormat
from llamba_cli.job.sandbox import BoundedSandbox, Budget, is_template_raise, rendering

_ROLES = ("system", "developer", "user", "assistant", "tool")
# Rendered once when a builder is made, so a template that cannot render even the
# simplest conversation stops the job before the first row.
_PROBE_TEXT = "llamba format check"


@dataclass(frozen=True)
class PromptSpec:
    """Where a row's user content comes from, and the system message around it.

    `template` (`--template`) fills `{column}` fields from the row and wins over
    the columns; otherwise the prompt column is used when the row has a value
    there, else the messages column.  `system` (`--system`) is prepended as a
    system message unless a row's messages bring their own; an empty string
    means no system message.  A malformed `template` raises `ConfigError` here.
    """

    prompt_column: str = "prompt"
    messages_column: str = "messages"
    template: str | None = None
    system: str | None = None

    def __post_init__(self) -> None:
        if not self.prompt_column or not self.messages_column:
            raise ConfigError("the prompt and messages column names must not be empty")
        if self.template is not None:
            _RowTemplate.parse(self.template)


@dataclass(frozen=True)
class _RowTemplate:
    """A parsed `--template`: literal text, each piece followed by a column or None.

    The language is deliberately tiny: `{column}` and the escapes `{{` / `}}`.
    Attribute and index access, positional fields, conversions and format specs
    are refused, because `str.format` semantics on user strings reach into objects.
    """

    pieces: tuple[tuple[str, str | None], ...]

    @property
    def columns(self) -> tuple[str, ...]:
        """The columns used, in order of first use."""
        return tuple(dict.fromkeys(column for _, column in self.pieces if column is not None))

    @classmethod
    def parse(cls, text: str) -> _RowTemplate:
        """Parse `text`; `ConfigError` naming the offending field if it is not allowed."""
        if not text:
            raise ConfigError("--template must not be empty")
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as exc:
            raise ConfigError(
                f"--template {text!r}: {exc} (write {{{{ and }}}} for literal braces)"
            ) from None
        pieces: list[tuple[str, str | None]] = []
        for literal, field, format_spec, conversion in parsed:
            if field is not None:
                _check_field(text, field, format_spec, conversion)
            pieces.append((literal, field))
        return cls(tuple(pieces))

    def fill(self, row: Mapping[str, Any]) -> str:
        """The template with each field replaced by the row's value; `RowError` if unusable."""
        parts: list[str] = []
        for literal, column in self.pieces:
            parts.append(literal)
            if column is not None:
                parts.append(_cell_text(row, column))
        return "".join(parts)


def _check_field(text: str, field: str, format_spec: str | None, conversion: str | None) -> None:
    where = f"--template {text!r}"
    if not field or field.isdigit():
        raise ConfigError(f"{where}: fields must name a column, e.g. {{text}}, not {{{field}}}")
    if "." in field or "[" in field:
        raise ConfigError(
            f"{where}: field {{{field}}} uses attribute or index access; "
            "only plain column names are allowed"
        )
    if conversion is not None:
        raise ConfigError(f"{where}: field {{{field}!{conversion}}} has a conversion; remove it")
    if format_spec:
        raise ConfigError(f"{where}: field {{{field}:{format_spec}}} has a format spec; remove it")


def _cell_text(row: Mapping[str, Any], column: str) -> str:
    if column not in row:
        raise RowError(f"row has no column {column!r} (used by --template)")
    value = row[column]
    if value is None:
        raise RowError(f"column {column!r} is empty (null)")
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, numbers.Number)):
        return str(value)
    raise RowError(f"column {column!r} holds a {type(value).__name__}, not text or a number")


def _row_messages(value: Any, column: str) -> list[dict[str, str]]:
    """Validate a row's messages into fresh `{"role", "content"}` dicts."""
    if isinstance(value, str):
        # CSV cannot hold a list, so a JSON-encoded one is accepted there.
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            raise RowError(f"column {column!r} is text but not a JSON list of messages") from None
    if not isinstance(value, (list, tuple)) or not value:
        raise RowError(f"column {column!r} must be a non-empty list of {{role, content}} messages")
    messages: list[dict[str, str]] = []
    for index, message in enumerate(value):
        where = f"{column}[{index}]"
        if not isinstance(message, Mapping):
            raise RowError(f"{where} is a {type(message).__name__}, not a {{role, content}} object")
        role = message.get("role")
        if role not in _ROLES:
            raise RowError(f"{where} has role {role!r}; expected one of {', '.join(_ROLES)}")
        content = _content_text(message.get("content"), where)
        messages.append({"role": "system" if role == "developer" else role, "content": content})
    return messages


def _content_text(content: Any, where: str) -> str:
    """A message's content as text: a string, or OpenAI-style text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)) and content:
        texts: list[str] = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif (
                isinstance(part, Mapping)
                and part.get("type", "text") == "text"
                and isinstance(part.get("text"), str)
            ):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise RowError(
                    f"{where} content has a {kind!r} part; only text parts are supported"
                )
        return "\n".join(texts)
    raise RowError(
        f"{where} content is a {type(content).__name__}, not a string or a list of text parts"
    )


class _RenderFailure(Exception):
    """A template failed on one conversation; the caller decides whose fault it is."""


def _sandbox() -> BoundedSandbox:
    """An environment rendering like `transformers`' `apply_chat_template`."""
    return BoundedSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


class PromptBuilder:
    """Turns input rows into full prompt text for one spec and one format.

    The format's template is compiled, and checked on a one-message conversation,
    when the builder is made: a template that does not compile, fails on that
    conversation, ignores the messages, or touches Python internals raises
    `TemplateError` before any row is read.  After that, `build` raises
    `RowError` for a problem with one row, and `TemplateError` only if a template
    attempts an unsafe operation.
    """

    def __init__(
        self, spec: PromptSpec, fmt: PromptFormat, *, bos_token: str = "", eos_token: str = ""
    ) -> None:
        self.spec = spec
        self.fmt = fmt
        self._row_template = (
            _RowTemplate.parse(spec.template) if spec.template is not None else None
        )
        self._system = spec.system or None
        self._tokens = {"bos_token": bos_token, "eos_token": eos_token}
        try:
            self._template = _sandbox().from_string(fmt.template)
        except (jinja2.TemplateError, RecursionError) as exc:
            raise TemplateError(
                f"prompt format {fmt.name!r} does not compile: {_describe(exc)}"
            ) from None
        self._check_renders()

    def check_columns(self, columns: Sequence[str]) -> None:
        """`ConfigError` unless the input's `columns` can supply what rows need.

        With a template, every column it names must exist; otherwise the prompt
        column or the messages column must.
        """
        present = set(columns)
        available = ", ".join(columns) or "none"
        if self._row_template is not None:
            missing = [c for c in self._row_template.columns if c not in present]
            if missing:
                names = ", ".join(repr(c) for c in missing)
                raise ConfigError(
                    f"--template uses column(s) {names} that the input lacks (columns: {available})"
                )
            return
        if self.spec.prompt_column not in present and self.spec.messages_column not in present:
            raise ConfigError(
                f"the input has neither a {self.spec.prompt_column!r} nor a "
                f"{self.spec.messages_column!r} column (columns: {available})"
            )

    def build(self, row: Mapping[str, Any]) -> str:
        """The full prompt text for `row`; `RowError` if the row cannot make one."""
        messages = self._conversation(row)
        try:
            return self._render(messages)
        except _RenderFailure as exc:
            raise RowError(f"prompt format {self.fmt.name!r} failed on this row: {exc}") from None

    def _conversation(self, row: Mapping[str, Any]) -> list[dict[str, str]]:
        if self._row_template is not None:
            content = self._row_template.fill(row)
            if not content:
                raise RowError("--template produced an empty prompt for this row")
            return self._with_system([{"role": "user", "content": content}])
        prompt = row.get(self.spec.prompt_column)
        if prompt is not None:
            column = self.spec.prompt_column
            if not isinstance(prompt, str):
                raise RowError(f"column {column!r} is a {type(prompt).__name__}, not a string")
            if not prompt:
                raise RowError(f"column {column!r} is an empty string")
            return self._with_system([{"role": "user", "content": prompt}])
        messages = row.get(self.spec.messages_column)
        if messages is not None:
            return self._with_system(_row_messages(messages, self.spec.messages_column))
        raise RowError(
            f"row has no value in {self.spec.prompt_column!r} or {self.spec.messages_column!r}"
        )

    def _with_system(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        if self._system is None or any(m["role"] == "system" for m in messages):
            return messages
        return [{"role": "system", "content": self._system}, *messages]

    def _render(self, messages: list[dict[str, str]]) -> str:
        """Render through the sandbox; `TemplateError` for an unsafe template,
        `_RenderFailure` for any other failure."""
        content = sum(len(m["content"]) for m in messages)
        try:
            # `tools` and `documents` are None as in transformers, for model
            # templates that test them.
            with rendering(Budget.for_content(content)):
                return self._template.render(
                    messages=messages,
                    add_generation_prompt=True,
                    tools=None,
                    documents=None,
                    **self._tokens,
                )
        except SecurityError as exc:
            raise TemplateError(
                f"prompt format {self.fmt.name!r} attempted an unsafe operation and was "
                f"stopped: {_describe(exc)}"
            ) from None
        except Exception as exc:
            if is_template_raise(exc):
                raise _RenderFailure(_one_line(exc)) from None
            # Whatever a template does wrong (undefined values, type errors) is a
            # failure of that template, never of this program.
            raise _RenderFailure(_describe(exc)) from None

    def _check_renders(self) -> None:
        probe = self._with_system([{"role": "user", "content": _PROBE_TEXT}])
        with_system = " with a system message" if self._system is not None else ""
        try:
            text = self._render(probe)
        except _RenderFailure as exc:
            raise TemplateError(
                f"prompt format {self.fmt.name!r} cannot render a single user message"
                f"{with_system}: {exc}"
            ) from None
        if _PROBE_TEXT not in text:
            raise TemplateError(
                f"prompt format {self.fmt.name!r} does not put the message content into the "
                "prompt (does its template use messages[i]['content']?)"
            )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, jinja2.TemplateSyntaxError):
        return f"line {exc.lineno}: {_one_line(exc.message)}"
    if isinstance(exc, jinja2.TemplateError):
        return _one_line(exc.message or type(exc).__name__)
    return _one_line(f"{type(exc).__name__}: {exc}")
