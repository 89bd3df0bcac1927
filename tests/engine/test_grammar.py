"""Constrained decoding in the engine, on the real embedded model: JSON Schema and GBNF
grammars, mixed batches, incomplete output, and the schema checks that run first.

The schemas use nested objects, enums, integer ranges (minimum/maximum: llama-cpp-python's
converter ignores them, llamba adds them), string arrays with maxItems and strings with
maxLength; every completed row must parse and validate (tests/schema_check.py).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time

import numpy as np
import pytest

from llamba_cli.engine import Grammar, Request, SamplingParams, schema_to_gbnf
from llamba_cli.engine.capture import capture_stderr
from llamba_cli.engine.sampler import apply_grammar, sample
from llamba_cli.engine.schema import integer_range_rule
from llamba_cli.errors import ConfigError
from tests.schema_check import problems

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 16},
                "zip": {"type": "integer", "minimum": 10000, "maximum": 99999},
            },
            "required": ["city", "zip"],
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "address", "active"],
}
PROMPTS = [
    "A user record as JSON:\n",
    "Alice is a 34 year old admin from Paris. JSON:",
    "Generate a JSON object for a guest user named Bob.\n",
    "Customer database entry:\n",
]
YES_NO = 'root ::= "yes" | "no"'


def run(engine, reqs):
    done = sorted(engine.run(reqs), key=lambda r: r.id)
    assert [r.id for r in done] == sorted(r.id for r in reqs)
    return done


# -- schema -> grammar, without the model --------------------------------------------


def _gbnf_regex(expr: str) -> re.Pattern[str]:
    """The few GBNF forms integer_range_rule writes ("lit", [a-b], ( | )) as a regex."""
    expr = re.sub(r'"([^"]*)"', lambda m: re.escape(m.group(1)), expr)
    return re.compile(expr.replace(" ", ""))


@pytest.mark.parametrize(
    ("lo", "hi"),
    [(0, 0), (1, 120), (-5, 5), (-130, -7), (7, 7), (10, 99), (99, 1001), (-1, 0),
     (123, 4567), (None, 3), (5, None), (None, None)],
)  # fmt: skip
def test_integer_range_rule_matches_exactly_the_range(lo, hi):
    pattern = _gbnf_regex(integer_range_rule(lo, hi))
    low = -(10**5) if lo is None else lo
    high = 10**5 if hi is None else hi
    for v in range(-3000, 3001):
        assert (pattern.fullmatch(str(v)) is not None) == (low <= v <= high), v
    for v in (low, high, 10**5, -(10**5)):
        assert (pattern.fullmatch(str(v)) is not None) == (low <= v <= high), v
    for text in ("01", "-0", "007", "", "-", "+1", "1.0"):
        assert pattern.fullmatch(text) is None, text


def test_schema_to_gbnf_enforces_bounds_and_json_strings():
    gbnf = schema_to_gbnf(json.dumps(PERSON))
    # The ranges, not the converter's bare integer rule.
    assert f"age ::= {integer_range_rule(18, 99)} space" in gbnf.splitlines()
    assert f"address-zip ::= {integer_range_rule(10000, 99999)} space" in gbnf.splitlines()
    # Raw control characters are not JSON inside strings: the char rule must exclude them.
    assert r"\x00-\x1F" in gbnf
    assert "root ::=" in gbnf


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ('{"type": "object",', "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"type": "array", "items": {"type": "string"}, "uniqueItems": true}', "'uniqueItems'"),
        ('{"type": "number", "minimum": 0}', "integers only"),
        ('{"type": "string", "format": "email"}', "format 'email'"),
        ('{"type": ["string", "null"], "maxLength": 3}', "'type' as a list"),
        ('{"type": "integer", "minimum": 5, "maximum": 4}', "no integer"),
        ('{"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]}',
         "required property 'b'"),
        ('{"properties": {"a": {"not": {"type": "string"}}}}', "(at /properties/a)"),
        ('{"type": "foo"}', "cannot convert the schema"),
        ('{"$ref": "https://example.com/s.json"}', "cannot convert the schema"),
    ],
)  # fmt: skip
def test_unsupported_or_invalid_schemas_raise_one_line(schema, message):
    with pytest.raises(ConfigError) as info:
        schema_to_gbnf(schema)
    text = str(info.value)
    assert message in text and "\n" not in text


# -- Grammar on the model's vocabulary -----------------------------------------------


@pytest.mark.parametrize(
    ("gbnf", "reason"),
    [
        ('root ::= "yes" | "no', "unexpected end of input"),
        ("root ::= foo", "Undefined rule identifier 'foo'"),
        ('root ::= root "a" | "b"', "left recursion"),
        ('answer ::= "yes"', "root"),
        ("   \n", "empty"),
    ],
)
def test_bad_grammar_raises_config_error_with_llama_cpp_reason(model, gbnf, reason, capfd):
    with pytest.raises(ConfigError) as info:
        Grammar(model, gbnf)
    assert reason in str(info.value) and "\n" not in str(info.value)
    assert "error parsing grammar" not in capfd.readouterr().err  # captured, not printed


def test_stderr_capture_takes_only_what_it_claims(capfd):
    def claim(printed: bytes) -> tuple[bytes, bytes]:
        at = printed.find(b"MINE\n")
        if at < 0:
            return b"", printed
        return b"MINE\n", printed[:at] + printed[at + 5 :]

    with capture_stderr(claim) as got:
        os.write(2, b"before ")
        os.write(2, b"MINE\n")
        other = threading.Thread(target=lambda: os.write(2, b"from another thread\n"))
        other.start()
        other.join()
    assert got.claimed == b"MINE\n"
    assert capfd.readouterr().err == "before from another thread\n"


def test_failing_grammars_do_not_eat_another_threads_output(model, capfd):
    """A progress bar writing to stderr while grammars compile loses nothing."""
    stop = threading.Event()
    written: list[str] = []

    def progress() -> None:
        while not stop.is_set():
            line = f"progress {len(written)}\n"
            os.write(2, line.encode())
            written.append(line)
            time.sleep(0.0002)

    writer = threading.Thread(target=progress)
    writer.start()
    try:
        for _ in range(30):
            with pytest.raises(ConfigError, match="unexpected end of input"):
                Grammar(model, 'root ::= "yes" | "no')
    finally:
        stop.set()
        writer.join()
    err = capfd.readouterr().err
    assert sorted(err.splitlines(keepends=True)) == sorted(written)  # delayed at most
    assert "error parsing grammar" not in err


def test_grammar_state_allowed_accept_complete_and_clone(model):
    compiled = Grammar(model, YES_NO)
    try:
        state = compiled.clone()
        yes = model.tokenize("yes", add_bos=False)
        no = model.tokenize("no", add_bos=False)
        hello = model.tokenize("hello", add_bos=False)
        ids = np.array([yes[0], no[0], hello[0], model.eos], dtype=np.int32)
        assert state.allowed(ids).tolist() == [True, True, False, False]
        assert not state.complete()
        for tok in yes:
            state.accept(tok)
        assert state.complete()  # only now may end-of-generation come
        assert state.allowed(ids).tolist() == [False, False, False, True]
        # The compiled grammar and a new clone are untouched by another clone's tokens.
        assert compiled.allowed(ids).tolist() == [True, True, False, False]
        assert compiled.clone().allowed(ids).tolist() == [True, True, False, False]
        state.close()
        state.close()  # idempotent
    finally:
        compiled.close()


def test_candidates_are_a_superset_of_the_allowed_tokens(model):
    """The byte-level shortcut must never lose a token the grammar allows."""
    compiled = Grammar(model, schema_to_gbnf(json.dumps(PERSON)))
    everything = np.arange(model.n_vocab, dtype=np.int32)
    try:
        head = '{"name": "Al", "age": 3'
        prefixes = [head[:12], head, head + '4, "role": "a', head + '4, "role": "user", "tags": [']
        for text in ["", *prefixes]:
            state = compiled.clone()
            for tok in model.tokenize(text, add_bos=False):
                assert state.allows(tok), text
                state.accept(tok)
            allowed = set(everything[state.allowed(everything)].tolist())
            assert allowed, text
            assert allowed <= set(state.candidates().tolist()), text
            few = state.candidates(limit=4096)
            if few is not None:
                assert allowed <= set(few.tolist())
            state.close()
    finally:
        compiled.close()


def test_redraw_is_the_chain_over_the_allowed_tokens(model):
    """Where the grammar leaves few tokens, a rejected draw is redrawn exactly as the
    chain would draw from the row with every disallowed logit at -inf (same seed)."""
    compiled = Grammar(model, schema_to_gbnf(json.dumps(PERSON)))
    everything = np.arange(model.n_vocab, dtype=np.int32)
    try:
        for text in ("", '{"name": "x", "age": 4', '{"name": "x", "age": 42, "role": "a'):
            state = compiled.clone()
            for tok in model.tokenize(text, add_bos=False):
                state.accept(tok)
            mask = state.allowed(everything)
            for seed in range(12):
                row = np.random.default_rng(seed).standard_normal(model.n_vocab) * 3
                row = row.astype(np.float32)
                params = SamplingParams(temperature=0 if seed % 4 == 0 else 0.8, seed=seed)
                got_req, want_req = (Request(id=0, prompt="", params=params) for _ in "ab")
                got_req.rng, want_req.rng = (np.random.default_rng(seed) for _ in "ab")
                first = sample(row[None, :].copy(), [0], [got_req])[0]
                got = apply_grammar(row.copy(), got_req, state, first)
                masked = np.where(mask, row, -np.inf).astype(np.float32)
                sample(row[None, :].copy(), [0], [want_req])  # uses up the first draw
                want = first if mask[first] else sample(masked[None, :], [0], [want_req])[0]
                assert got == want and mask[got], (text, seed)
            state.close()
    finally:
        compiled.close()


# -- the engine ------------------------------------------------------------------------


def test_json_rows_parse_and_validate_greedy_and_sampled(make_engine):
    engine = make_engine(slots=8)
    gbnf = schema_to_gbnf(json.dumps(PERSON))
    reqs = [
        Request(id=i, prompt=p, grammar_text=gbnf,
                params=SamplingParams(temperature=0 if i < 4 else 0.9, max_tokens=200, seed=i))
        for i, p in enumerate(PROMPTS * 2)
    ]  # fmt: skip
    for req in run(engine, reqs):
        assert req.error is None, (req.error, req.text)
        assert req.finish_reason == "stop"
        value = json.loads(req.text)
        assert problems(value, PERSON) == [], req.text
        assert req.grammar is None  # freed when it finished
    assert engine.stats.generated_tokens > 0


def test_constrained_and_unconstrained_rows_share_one_batch(make_engine):
    engine = make_engine(slots=6)
    gbnf = schema_to_gbnf(json.dumps(PERSON))
    free = SamplingParams(temperature=0, max_tokens=12)
    reqs = []
    for i, prompt in enumerate(PROMPTS):
        json_params = SamplingParams(temperature=0, max_tokens=200)
        yes_no_params = SamplingParams(temperature=0.7, max_tokens=4, seed=i)
        reqs += [
            Request(id=3 * i, prompt=prompt, params=json_params, grammar_text=gbnf),
            Request(id=3 * i + 1, prompt=prompt, params=free),
            Request(id=3 * i + 2, prompt=f"{prompt} Valid? Answer:", params=yes_no_params,
                    grammar_text=YES_NO),
        ]  # fmt: skip
    done = run(engine, reqs)
    for req in done:
        assert req.error is None, req.error
        if req.grammar_text == YES_NO:
            assert req.text in ("yes", "no") and req.finish_reason == "stop"
        elif req.grammar_text is not None:
            assert problems(json.loads(req.text), PERSON) == [], req.text
    # The unconstrained rows are what they are with no grammar anywhere in the batch
    # (first tokens: batch shape may flip a later near-tie, see the engine notes).
    free_rows = [r for r in done if r.grammar_text is None]
    alone = run(make_engine(slots=6), [Request(id=r.id, prompt=r.prompt, params=free)
                                       for r in free_rows])  # fmt: skip
    pairs = zip(free_rows, alone, strict=True)
    same = sum(a.generated()[:4] == b.generated()[:4] for a, b in pairs)
    assert same >= len(alone) - 1
    assert any(not r.text.lstrip().startswith("{") for r in free_rows)


def test_seeded_constrained_rows_repeat_exactly(make_engine):
    gbnf = schema_to_gbnf(json.dumps(PERSON))

    def texts():
        reqs = [Request(id=i, prompt=p, grammar_text=gbnf,
                        params=SamplingParams(temperature=1.0, max_tokens=200, seed=100 + i))
                for i, p in enumerate(PROMPTS)]  # fmt: skip
        return [r.text for r in run(make_engine(slots=4), reqs)]

    assert texts() == texts()


def test_max_tokens_before_the_json_closes_is_a_length_error(make_engine):
    engine = make_engine(slots=4)
    gbnf = schema_to_gbnf(json.dumps(PERSON))
    reqs = [Request(id=i, prompt=p, grammar_text=gbnf,
                    params=SamplingParams(temperature=0, max_tokens=5))
            for i, p in enumerate(PROMPTS)]  # fmt: skip
    for req in run(engine, reqs):
        assert req.finish_reason == "length"
        assert req.error == "output did not complete the grammar within max-tokens"
        assert req.completion_tokens == 5
        assert req.grammar is None


def test_stop_string_inside_the_json_is_an_error(make_engine):
    engine = make_engine(slots=2)
    gbnf = schema_to_gbnf(json.dumps(PERSON))
    params = SamplingParams(temperature=0, max_tokens=200, stop=(":",))
    (req,) = run(engine, [Request(id=0, prompt=PROMPTS[0], params=params, grammar_text=gbnf)])
    assert req.finish_reason == "stop"
    assert req.error == "a stop string ended the output before it completed the grammar"


def test_yes_no_grammar_with_any_sampling(make_engine):
    engine = make_engine(slots=4)
    reqs = [Request(id=i, prompt=f"Question {i}: is water wet? Answer:",
                    params=SamplingParams(temperature=t, max_tokens=8, seed=i),
                    grammar_text=YES_NO)
            for i, t in enumerate([0, 0.5, 1.0, 1.5, 2.0, 1.0])]  # fmt: skip
    for req in run(engine, reqs):
        assert req.error is None and req.finish_reason == "stop"
        assert req.text in ("yes", "no")


def test_bad_grammar_or_grammar_on_labels_is_a_row_error(make_engine):
    engine = make_engine(slots=2)
    reqs = [
        Request(id=0, prompt="x", grammar_text="root ::= nope"),
        Request(id=1, prompt="Sentiment:", labels=("good", "bad"), grammar_text=YES_NO),
        Request(
            id=2,
            prompt="Answer:",
            params=SamplingParams(temperature=0, max_tokens=4),
            grammar_text=YES_NO,
        ),
    ]
    bad, labelled, good = run(engine, reqs)
    assert bad.finish_reason == "error" and "Undefined rule identifier 'nope'" in bad.error
    assert labelled.finish_reason == "error" and "classification" in labelled.error
    assert good.error is None and good.text in ("yes", "no")


def test_the_reason_survives_another_owner_of_llama_cpp_log(model):
    """llama.cpp's log callback is process-wide, and importing llama-cpp-python's
    package sets its own; a grammar error still says why afterwards."""
    import ctypes

    import llama_cpp
    import llama_cpp._logger

    llama_cpp.llama_log_set(llama_cpp._logger.llama_log_callback, ctypes.c_void_p(0))
    with pytest.raises(ConfigError, match="left recursion"):
        Grammar(model, 'root ::= root "a" | "b"')
