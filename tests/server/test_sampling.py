"""An OpenAI body's sampling fields as engine parameters, without a model."""

from __future__ import annotations

from typing import Any

import pytest

from llamba_cli.job.formats import load_format
from llamba_cli.openai.errors import InvalidRequest
from llamba_cli.openai.sampling import choice_seed, grammar_for, sampling_params
from llamba_cli.openai.schemas import SamplingBody
from llamba_cli.openai.served import ServedModel

SERVED = ServedModel(name="m", prompt_format=load_format("plain"), n_vocab=1000, n_ctx_seq=512)


def body(**fields: Any) -> SamplingBody:
    return SamplingBody.model_validate(fields)


def test_choice_seeds_are_the_seed_then_distinct_63_bit_values() -> None:
    assert choice_seed(None, 0) is None and choice_seed(None, 3) is None
    assert choice_seed(42, 0) == 42
    assert choice_seed(-1, 0) == (1 << 63) - 1  # masked to what llama.cpp's sampler takes
    seeds = [choice_seed(42, i) for i in range(64)]
    assert seeds == [choice_seed(42, i) for i in range(64)]
    assert len(set(seeds)) == 64
    assert all(s is not None and 0 <= s < 1 << 63 for s in seeds)
    assert choice_seed(43, 1) != choice_seed(42, 1)


def test_stop_strings_keep_their_order_without_repeats() -> None:
    params = sampling_params(
        body(stop=["END", "\n", "END"], top_k=-1),
        SERVED,
        max_tokens=5,
        seed=None,
        logprobs=None,
        extra_stop=("\n", "<eot>"),
    )
    assert params.stop == ("END", "\n", "<eot>")
    assert params.top_k == 0  # -1 (vLLM's "off") is llama.cpp's 0
    assert params.max_tokens == 5


def test_one_output_constraint_at_most() -> None:
    assert grammar_for(body()) is None
    assert grammar_for(body(grammar='root ::= "a"')) == 'root ::= "a"'
    schema = grammar_for(body(json_schema={"type": "integer"}))
    assert schema is not None and "root ::=" in schema
    with pytest.raises(InvalidRequest) as caught:
        grammar_for(body(json_schema={"type": "integer"}, grammar='root ::= "a"'))
    assert caught.value.param == "grammar"
    with pytest.raises(InvalidRequest, match="the grammar is empty"):
        grammar_for(body(grammar="  "))
