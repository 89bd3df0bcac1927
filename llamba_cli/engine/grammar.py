"""Constrained decoding: GBNF grammars, compiled once, with a parse state per sequence.

`schema_to_gbnf` turns a JSON Schema into GBNF (llama-cpp-python's converter, with
integer bounds and JSON-exact string characters added).  `Grammar(model, gbnf)`
compiles a grammar (llama.cpp's grammar sampler, through `llama.GrammarSampler`);
each request samples under its own `clone()`.  Which tokens may come next is found
without asking the grammar about the whole vocabulary (see `_GrammarVocab`).
"""

from __future__ import annotations

import random
import threading
import weakref
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from llamba_cli.engine.capture import capture_stderr
from llamba_cli.engine.llama import (
    PRIMITIVE_RULES,
    RESERVED_NAMES,
    BuiltinRule,
    GrammarSampler,
    Model,
    SchemaConverter,
    clear_log,
    recent_log,
    token_data_dtype,
    vocab_pieces,
)
from llamba_cli.engine.schema import (
    INTEGER_BOUNDS,
    integer_bounds,
    integer_range_rule,
    parse_schema,
)
from llamba_cli.errors import ConfigError

__all__ = ["Grammar", "grammar_vocab_tables", "schema_to_gbnf", "use_grammar_vocab_tables"]

# A JSON string character as JSON allows it.  llama-cpp-python's converter uses
# `[^"\\]`, which lets raw control characters (a newline, a tab) into strings: the
# grammar would accept output that no JSON parser does.
_JSON_CHAR = r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" ' + " ".join(["[0-9a-fA-F]"] * 4) + ")"


class _Converter(SchemaConverter):
    """The converter, plus integer bounds and JSON-exact string characters."""

    def visit(self, schema: Any, name: str) -> str:
        if (
            isinstance(schema, dict)
            and schema.get("type") == "integer"
            and not {"$ref", "oneOf", "anyOf", "const", "enum"} & schema.keys()
            and any(k in schema for k in INTEGER_BOUNDS)
        ):
            rule = integer_range_rule(*integer_bounds(schema))
            rule_name = name + "-" if name in RESERVED_NAMES else name or "root"
            return str(self._add_rule(rule_name, rule + " space"))
        return str(super().visit(schema, name))

    def _add_primitive(self, name: str, rule: Any) -> str:
        if rule is PRIMITIVE_RULES["char"]:
            rule = BuiltinRule(_JSON_CHAR, [])
        return str(super()._add_primitive(name, rule))


def schema_to_gbnf(schema_text: str) -> str:
    """GBNF (start symbol `root`) for a JSON Schema given as JSON text.

    Raises ConfigError (one line) when the text is not JSON, the schema uses something
    the grammar would not enforce (see `engine.schema`), or the converter fails.
    """
    schema = parse_schema(schema_text)
    converter = _Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    try:
        schema = converter.resolve_refs(schema, "schema")
        converter.visit(schema, "")
    except ConfigError:
        raise
    except Exception as e:  # the converter reports with asserts and bare exceptions
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"cannot convert the schema to a grammar: {detail}") from None
    return str(converter.format_grammar())


_PARSE_ERROR = b"error parsing grammar: "


def _parser_message(gbnf: str) -> Any:
    """A `capture_stderr` claim: llama.cpp's report of a grammar it cannot parse
    ("parse: error parsing grammar: WHY\\n\\nGRAMMAR\\n"), apart from anything else."""
    tail = b"\n\n" + gbnf.encode() + b"\n"

    def claim(printed: bytes) -> tuple[bytes, bytes]:
        at = printed.find(_PARSE_ERROR)
        if at < 0:
            return b"", printed
        start = printed.rfind(b"\n", 0, at) + 1
        end = printed.find(tail, at)
        end = len(printed) if end < 0 else end + len(tail)
        return printed[start:end], printed[:start] + printed[end:]

    return claim


@dataclass(frozen=True)
class _Pieces:
    """Per-token facts from one pass over a vocabulary (see `llama.vocab_pieces`)."""

    first: np.ndarray  # int16: first byte of the piece, 256 for an empty one
    single: np.ndarray  # bool: the piece is that byte alone
    control: np.ndarray  # bool
    eog: np.ndarray  # bool

    DTYPES: ClassVar[dict[str, Any]] = {
        "first": np.int16,
        "single": np.bool_,
        "control": np.bool_,
        "eog": np.bool_,
    }


# Tokens a stored table is checked on, besides every token it marks end-of-generation
# and every single-byte probe: an independent random sample each time it is loaded.
_SPOT_CHECKS = 256


def grammar_vocab_tables(model: Model) -> dict[str, np.ndarray]:
    """The vocabulary tables grammar sampling needs for `model`, as plain arrays that
    a caller may store (one pass over the vocabulary, about a second at 262,144
    tokens, unless they are known already) and give back with `use_grammar_vocab_tables`."""
    p = _GrammarVocab.of(model).pieces
    return {name: getattr(p, name) for name in _Pieces.DTYPES}


def use_grammar_vocab_tables(model: Model, tables: dict[str, np.ndarray]) -> bool:
    """Adopt stored tables for `model` if they check out, instead of the pass over the
    vocabulary; False (and nothing adopted) if they do not.

    Checked here, whoever stored them: names, types and sizes; then llama.cpp is asked
    again about every end-of-generation token and single-byte probe the tables name,
    about the model's own end tokens, and about a fresh random sample of other tokens,
    and any difference rejects the whole table.  A wrong entry that escaped the sample
    could only narrow or widen the candidates offered to the grammar, which still
    decides itself which tokens are allowed."""
    if model in _GrammarVocab._by_model:
        return True
    n = model.n_vocab
    arrays = {}
    for name, dtype in _Pieces.DTYPES.items():
        a = tables.get(name)
        if not isinstance(a, np.ndarray) or a.dtype != dtype or a.shape != (n,):
            return False
        arrays[name] = a
    pieces = _Pieces(**arrays)
    # The standard library's generator: numpy's would import numpy.random (10 ms).
    check = set(random.sample(range(n), min(_SPOT_CHECKS, n)))
    check |= {int(t) for t in np.flatnonzero(pieces.eog | pieces.single)}
    check |= {t for t in (model.eos, model.bos) if 0 <= t < n}
    ids = np.array(sorted(check), dtype=np.int64)
    fresh = vocab_pieces(model, ids)
    for name, values in zip(_Pieces.DTYPES, fresh, strict=True):
        if not np.array_equal(getattr(pieces, name)[ids], values):
            return False
    _GrammarVocab._by_model[model] = _GrammarVocab(model, pieces)
    return True


class _GrammarVocab:
    """Facts about a model's vocabulary that grammar sampling needs; built once per model.

    - `banned`: control tokens other than end-of-generation.  llama.cpp's grammar sees
      their markup ("<unused0>") while llamba's text renders them as nothing, so they
      are never allowed: the grammar and the text must see the same bytes.
    - Tokens grouped by the first byte of their piece (`order`, `bounds`), and for each
      byte a probe token whose piece is that byte alone.  A token is allowed only if
      its first byte is, and one `apply` over the 256 probes tells which bytes are: so
      the tokens that can follow are found without asking the grammar about the whole
      vocabulary.  End-of-generation tokens, and tokens whose first byte has no probe,
      are always candidates.
    """

    _by_model: ClassVar[weakref.WeakKeyDictionary[Model, _GrammarVocab]] = (
        weakref.WeakKeyDictionary()
    )

    # One pass at a time: a server builds the tables on a thread of its own while it
    # serves, and a grammar request that comes meanwhile waits for that pass.
    _building: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def of(cls, model: Model) -> _GrammarVocab:
        tables = cls._by_model.get(model)
        if tables is None:
            with cls._building:
                tables = cls._by_model.get(model)
                if tables is None:
                    tables = cls._by_model[model] = cls(model, _Pieces(*vocab_pieces(model)))
        return tables

    def __init__(self, model: Model, pieces: _Pieces) -> None:
        self.pieces = pieces
        first, single, control, eog = pieces.first, pieces.single, pieces.control, pieces.eog
        probes = np.full(256, -1, dtype=np.int32)
        for t in np.flatnonzero(single & ~control)[::-1]:  # the lowest id per byte
            probes[first[t]] = t
        self.banned = control & ~eog
        self.eog = np.flatnonzero(eog).astype(np.int32)
        # int16 keys (0..257): numpy's stable sort of 16-bit integers is a radix sort,
        # a fifth of the time of a merge sort over 262,144 int32 keys.
        key = first.astype(np.int16)
        key[(key < 256) & (probes[np.minimum(key, 255)] < 0)] = 256
        key[eog] = 256  # always a candidate
        key[self.banned | ((first == 256) & ~eog)] = 257  # never
        self.order = np.argsort(key, kind="stable").astype(np.int32)
        self.bounds = np.searchsorted(key[self.order], np.arange(259)).astype(np.int64)
        self.probe_bytes = np.flatnonzero(probes >= 0)
        self.probes = probes[self.probe_bytes]
        self.always = self.order[self.bounds[256] : self.bounds[257]]


class _Scratch:
    """A `llama_token_data` buffer shared by every state of one compiled grammar (one
    sequence is sampled at a time)."""

    def __init__(self, model: Model) -> None:
        self.vocab = _GrammarVocab.of(model)
        self.buffer = np.zeros(0, dtype=token_data_dtype())

    def view(self, n: int) -> np.ndarray:
        if len(self.buffer) < n:
            self.buffer = np.zeros(max(n, 2 * len(self.buffer)), dtype=token_data_dtype())
        return self.buffer[:n]


class Grammar:
    """The parse state of one sequence under a GBNF grammar.

    `Grammar(model, gbnf)` compiles the text (start symbol `root`) and raises
    ConfigError with llama.cpp's reason when it cannot.  Each sequence needs its own
    state: compile once, then `clone()` a fresh one per request (cheap, no parsing).
    `allowed(ids)` says which of the token ids may come next; end-of-generation tokens
    are allowed only where the grammar is complete.  `accept(token)` advances the
    state and must only get a non-end-of-generation token that `allowed` approved:
    llama.cpp aborts the process on anything else.  `close()` frees the state (also
    done on garbage collection).  Not thread-safe; clones share a scratch buffer.
    """

    def __init__(self, model: Model, gbnf: str) -> None:
        if not gbnf.strip():
            raise ConfigError("the grammar is empty")
        clear_log()
        with capture_stderr(_parser_message(gbnf)) as printed:
            sampler = GrammarSampler.compile(model, gbnf)
        if sampler is None:
            said = printed.claimed.decode("utf-8", "replace").splitlines() + recent_log()
            said = [ln.strip() for ln in said if ln.strip()]
            reason = next((ln for ln in said if "error parsing grammar" in ln), "")
            reason = reason.split("error parsing grammar:", 1)[-1].strip()
            reason = reason or next((ln for ln in reversed(said) if "grammar" in ln), "")
            raise ConfigError("invalid grammar" + (f": {reason}" if reason else ""))
        self._sampler: GrammarSampler = sampler
        self._scratch = _Scratch(model)

    @classmethod
    def _wrap(cls, sampler: GrammarSampler, scratch: _Scratch) -> Grammar:
        self = cls.__new__(cls)
        self._sampler = sampler
        self._scratch = scratch
        return self

    def clone(self) -> Grammar:
        """An independent copy of this state (of a freshly compiled grammar: a new one)."""
        return Grammar._wrap(self._sampler.clone(), self._scratch)

    def allowed(self, token_ids: np.ndarray) -> np.ndarray:
        """A bool mask over `token_ids` (int32): which tokens the grammar allows next."""
        n = len(token_ids)
        if n == 0:
            return np.zeros(0, dtype=bool)
        data = self._scratch.view(n)
        data["id"] = token_ids
        data["logit"] = 0.0
        data["p"] = 0.0
        self._sampler.apply(data)  # the rejected get -inf
        return (data["logit"] != -np.inf) & ~self._scratch.vocab.banned[token_ids]

    def allows(self, token: int) -> bool:
        return bool(self.allowed(np.array([token], dtype=np.int32))[0])

    def candidates(self, limit: int | None = None) -> np.ndarray | None:
        """Token ids that may be allowed next: every allowed token is among them (those
        whose first byte the grammar allows, and end-of-generation).  None when there
        are more than `limit`, e.g. inside a JSON string, where almost any token fits."""
        v = self._scratch.vocab
        ok_bytes = v.probe_bytes[self.allowed(v.probes)]
        lo, hi = v.bounds[ok_bytes], v.bounds[ok_bytes + 1]
        if limit is not None and int((hi - lo).sum()) + len(v.always) > limit:
            return None
        return np.concatenate([v.order[a:b] for a, b in zip(lo, hi, strict=True)] + [v.always])

    def complete(self) -> bool:
        """Whether the text so far is a whole sentence of the grammar (may end here)."""
        eog = self._scratch.vocab.eog[:1]
        return bool(len(eog)) and bool(self.allowed(eog)[0])

    def accept(self, token: int) -> None:
        self._sampler.accept(token)

    def close(self) -> None:
        self._sampler.close()
