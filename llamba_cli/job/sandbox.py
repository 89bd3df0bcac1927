"""The Jinja sandbox every prompt template renders in, with bounds on what it may cost.

A chat template read from a model file, or a format file from anywhere, is untrusted
input.  Jinja's immutable sandbox already keeps it away from Python internals; this
environment adds:

- unsafe attribute access fails at once (the plain sandbox renders it as an empty
  string and carries on);
- a size budget per render (`Budget`): four times the size of the conversation plus
  1 MiB of characters.  No string or list a template builds may exceed it: `*`, `+`,
  `%`, `**`, `~`, block captures and the output itself are checked before the value
  is built, and so are the filters and string methods that take a width or a count
  (`center`, `indent`, `format`, `ljust`, `replace`, `join`, ...);
- an allocation budget per render: everything those build, and what every filter and
  call returns, adds up to at most `TOTAL_FACTOR` times the size budget, so a loop
  cannot pile up values that are each small enough;
- a step budget per render: loop iterations, calls (macros included) and filters
  together may not exceed `MAX_STEPS`, so nested loops end quickly;
- `lipsum` is gone, and `str.translate` and nested `str.format` specs are refused.

Exceeding a bound raises `TemplateLimit`; the caller turns it into an error for the
row (or the format, when it happens on the probe conversation).
"""

from __future__ import annotations

import functools
import json
import math
import re
import threading
from collections.abc import Iterable, Iterator, Sized
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn

from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError
from jinja2.filters import (
    do_center,
    do_format,
    do_indent,
    do_replace,
    do_wordwrap,
    sync_do_join,
    sync_do_slice,
)
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import pass_environment

MAX_STEPS = 1_000_000
DEFAULT_CHARS = 1 << 20
TOTAL_FACTOR = 64
_MAX_INT_BITS = 1 << 16
_MAX_JSON_INDENT = 64
# Digits of a %-format width or precision, e.g. "%2000000000d".
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")
_STR_WIDTH_METHODS = frozenset({"center", "ljust", "rjust", "zfill"})


class TemplateLimit(Exception):
    """A render went over one of its bounds."""


@dataclass
class Budget:
    """What one render may spend: characters per value, characters built in all
    (`allocated` counts up to `TOTAL_FACTOR * chars`), and steps."""

    chars: int = DEFAULT_CHARS
    steps: int = MAX_STEPS
    allocated: int = 0

    @classmethod
    def for_content(cls, content_chars: int) -> Budget:
        return cls(chars=4 * content_chars + DEFAULT_CHARS)


_state = threading.local()


def _budget() -> Budget:
    budget: Budget | None = getattr(_state, "budget", None)
    if budget is None:  # compile-time constant folding, or a render outside `rendering`
        budget = _state.budget = Budget()
    return budget


class rendering:
    """`with rendering(budget): template.render(...)` renders under `budget`."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget

    def __enter__(self) -> Budget:
        self._saved = getattr(_state, "budget", None)
        _state.budget = self.budget
        return self.budget

    def __exit__(self, *exc: object) -> None:
        _state.budget = self._saved


def _size(n: int, what: str) -> None:
    """Account for a value of `n` characters (or items) about to be built."""
    budget = _budget()
    if n > budget.chars:
        raise TemplateLimit(f"template went over its limits: {what} of {n} (limit {budget.chars})")
    budget.allocated += max(n, 0)
    if budget.allocated > TOTAL_FACTOR * budget.chars:
        raise TemplateLimit(
            f"template went over its limits: built more than {TOTAL_FACTOR * budget.chars}"
            " characters in all"
        )


def _step(n: int = 1) -> None:
    budget = _budget()
    budget.steps -= n
    if budget.steps < 0:
        raise TemplateLimit(
            f"template went over its limits: more than {MAX_STEPS} loop iterations and calls"
        )


def _length(value: Any) -> int | None:
    return len(value) if isinstance(value, str | list | tuple) else None


def _check_percent(fmt: str, args: Any) -> None:
    for match in _PERCENT_SPEC.finditer(fmt):
        for number in match.groups():
            if number == "*":
                raise TemplateLimit("template went over its limits: '*' widths are not allowed")
            if number is not None:
                _size(int(number), "a format width")
    _size(len(fmt) + _rough_size(args), "a formatted string")


def _rough_size(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_rough_size(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_rough_size(v) for v in value)
    return 32


def _check_int_bits(bits: float) -> None:
    if bits > _MAX_INT_BITS:
        raise TemplateLimit(f"template went over its limits: an integer of about {bits:.0f} bits")


def _mul(left: Any, right: Any) -> Any:
    for seq, count in ((left, right), (right, left)):
        n = _length(seq)
        if n is not None and isinstance(count, int):
            _size(n * max(count, 0), "a repeated string or list")
            return seq * count
    if isinstance(left, int) and isinstance(right, int):
        _check_int_bits(left.bit_length() + right.bit_length())
    return left * right


def _add(left: Any, right: Any) -> Any:
    a, b = _length(left), _length(right)
    if a is not None and b is not None:
        _size(a + b, "a joined string or list")
    return left + right


def _pow(left: Any, right: Any) -> Any:
    if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
        _check_int_bits(right * math.log2(abs(left)))
    return left**right


def _mod(left: Any, right: Any) -> Any:
    if isinstance(left, str):
        _check_percent(left, right)
    return left % right


_BINOPS = {"*": _mul, "+": _add, "**": _pow, "%": _mod}


def _join_parts(parts: Iterable[Any]) -> str:
    """`"".join` of the parts as text, failing as soon as the total is over budget."""
    out: list[str] = []
    total = 0
    limit = _budget().chars
    for part in parts:
        text = str(part)
        total += len(text)
        if total > limit:
            _size(total, "a rendered text")
        out.append(text)
    _size(total, "a rendered text")
    return "".join(out)


class _Buffer(list[Any]):
    """The list a block capture, macro body or filter block writes into."""

    total = 0

    def append(self, item: Any) -> None:
        self._grow(item)
        super().append(item)

    def extend(self, items: Iterable[Any]) -> None:
        for item in items:
            self.append(item)

    def _grow(self, item: Any) -> None:
        self.total += len(item) if isinstance(item, str) else 32
        if self.total > _budget().chars:
            _size(self.total, "a captured text")


def _bounded_iter(iterable: Any) -> Iterator[Any]:
    """Each loop's iterable, charged one step per item."""
    for item in iterable:
        _step()
        yield item


def _check_str_call(obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Refuse the string methods that could build something over budget."""
    name = getattr(obj, "__name__", "")
    target = _str_owner(obj)
    assert target is not None
    values = [*args, *kwargs.values()]
    if name in _STR_WIDTH_METHODS:
        for value in values:
            if isinstance(value, int):
                _size(value, f"a str.{name} width")
    elif name == "expandtabs":
        size = values[0] if values and isinstance(values[0], int) else 8
        _size(len(target) + target.count("\t") * max(size, 0), "an expanded string")
    elif name == "replace":
        _check_replace(target, *values)
    elif name == "join":
        items = list(values[0]) if values else []
        _size(sum(_rough_size(i) for i in items) + len(target) * len(items), "a joined string")
    elif name in ("format", "format_map"):
        if target.count("{") > 0 and re.search(r"\{[^{}]*:[^{}]*\{", target):
            raise TemplateLimit("template went over its limits: nested format specs")
        for width in re.findall(r":[^{}]*?(\d+)[^{}]*\}", target):
            _size(int(width), "a format width")
        _size(len(target) + _rough_size(values), "a formatted string")
    elif name == "translate":
        raise SecurityError("str.translate is not available in templates")


def _str_owner(obj: Any) -> str | None:
    """The string whose method `obj` is (the sandbox wraps `str.format` in a function)."""
    for candidate in (obj, getattr(obj, "__wrapped__", None)):
        owner = getattr(candidate, "__self__", None)
        if isinstance(owner, str):
            return owner
    return None


def _check_replace(text: Any, old: Any = None, new: Any = None, count: Any = -1) -> None:
    if not (isinstance(text, str) and isinstance(old, str) and isinstance(new, str)):
        return
    hits = len(text) + 1 if old == "" else text.count(old)
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    _size(len(text) + hits * max(len(new) - len(old), 0), "a replaced string")


# -- filters that take a width or a count -------------------------------------------


def _center(value: Any, width: int = 80) -> str:
    _size(int(width), "a center width")
    return do_center(value, width)


def _indent(s: str, width: int | str = 4, first: bool = False, blank: bool = False) -> str:
    unit = len(width) if isinstance(width, str) else int(width)
    _size(len(str(s)) + (str(s).count("\n") + 1) * max(unit, 0), "an indented string")
    return do_indent(s, width, first, blank)


def _format(value: str, *args: Any, **kwargs: Any) -> str:
    _check_percent(str(value), kwargs or args)
    return do_format(value, *args, **kwargs)


@pass_environment
def _wordwrap(
    environment: Any,
    s: str,
    width: int = 79,
    break_long_words: bool = True,
    wrapstring: str | None = None,
    break_on_hyphens: bool = True,
) -> str:
    wrap = environment.newline_sequence if wrapstring is None else wrapstring
    _size(len(str(s)) * (1 + len(str(wrap))), "a wrapped string")
    return do_wordwrap(environment, s, width, break_long_words, wrapstring, break_on_hyphens)


def _replace(eval_ctx: Any, s: str, old: str, new: str, count: int | None = None) -> str:
    _check_replace(str(s), old, new, -1 if count is None else count)
    return do_replace(eval_ctx, s, old, new, count)


_replace.jinja_pass_arg = do_replace.jinja_pass_arg  # type: ignore[attr-defined]


def _join(eval_ctx: Any, value: Iterable[Any], d: str = "", attribute: Any = None) -> str:
    items = list(value)
    _size(sum(_rough_size(i) for i in items) + len(d) * len(items), "a joined string")
    return sync_do_join(eval_ctx, items, d, attribute)


_join.jinja_pass_arg = sync_do_join.jinja_pass_arg  # type: ignore[attr-defined]


def _slice(value: Any, slices: int, fill_with: Any = None) -> Any:
    total = len(value) if isinstance(value, Sized) else 0
    _size(int(slices) - total, "a slice count")
    return sync_do_slice(value, slices, fill_with)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Hugging Face's `tojson`: plain JSON, unlike Jinja's HTML-escaping built-in.
    if isinstance(indent, int) and indent > _MAX_JSON_INDENT:
        raise TemplateLimit(f"template went over its limits: tojson indent {indent}")
    text = json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )
    _size(len(text), "a JSON text")
    return text


def _metered(func: Any) -> Any:
    """`func` (a filter) charged one step, and the size of what it returns."""

    @functools.wraps(func)
    def metered(*args: Any, **kwargs: Any) -> Any:
        _step()
        result = func(*args, **kwargs)
        n = _length(result)
        if n is not None:
            _size(n, "a filtered value")
        return result

    return metered


class _TemplateRaised(Exception):
    """Raised by a template's own `raise_exception(...)`."""


def _raise_exception(message: str) -> NoReturn:
    raise _TemplateRaised(message)


def _strftime_now(date_format: str) -> str:
    _size(len(str(date_format)) * 8, "a date format")
    return datetime.now().strftime(date_format)


class _BoundedCodeGenerator(CodeGenerator):
    """Compiles `a ~ b` and output buffers through the environment, so their sizes
    are checked."""

    def buffer(self, frame: Frame) -> None:
        frame.buffer = self.temporary_identifier()
        self.writeline(f"{frame.buffer} = environment.llamba_buffer()")

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.llamba_join((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox with the bounds described in this module's docstring."""

    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset(_BINOPS)

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.globals.pop("lipsum", None)
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = _strftime_now
        self.filters.update(
            center=_center,
            indent=_indent,
            format=_format,
            wordwrap=_wordwrap,
            replace=_replace,
            join=_join,
            slice=_slice,
            tojson=_tojson,
        )
        self.filters = {name: _metered(f) for name, f in self.filters.items()}
        # Generated code binds `concat = environment.concat` for block captures,
        # macro bodies and the output.
        self.concat = _join_parts  # type: ignore[method-assign]

    def llamba_join(self, parts: tuple[Any, ...]) -> str:
        return _join_parts(parts)

    def llamba_iter(self, iterable: Any) -> Iterator[Any]:
        return _bounded_iter(iterable)

    def llamba_buffer(self) -> list[Any]:
        return _Buffer()

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(nodes.For):
            loop.iter = nodes.Call(
                nodes.EnvironmentAttribute("llamba_iter"), [loop.iter], [], None, None
            )
        return tree

    def unsafe_undefined(self, obj: Any, attribute: str) -> NoReturn:
        raise SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        return _BINOPS[operator](left, right)

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _step()
        if _str_owner(__obj) is not None:
            _check_str_call(__obj, args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        n = _length(result) if not isinstance(result, _Buffer) else None
        if n is not None:
            _size(n, "a returned value")
        return result


def is_template_raise(exc: BaseException) -> bool:
    """Whether `exc` came from the template's own `raise_exception(...)`."""
    return isinstance(exc, _TemplateRaised)
