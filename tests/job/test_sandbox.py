"""The bounded sandbox: hostile templates stop before they allocate, loop or print much."""

from __future__ import annotations

import time
import tracemalloc

import pytest

from llamba_cli.errors import TemplateError
from llamba_cli.job.formats import format_from_gguf
from llamba_cli.job.prompts import PromptBuilder, PromptSpec

CONTENT = "{{ messages[0]['content'] }}"

HOSTILE = [
    "{{ 'x' * 2000000000 }}",
    "{{ [1] * 2000000000 }}",
    "{{ 10 ** 1000000 }}",
    "{{ '%2000000000d' % 1 }}",
    "{{ '%*d' % (2000000000, 1) }}",
    "{{ '%2000000000d'|format(1) }}",
    "{{ 'x'|center(2000000000) }}",
    "{{ 'x'|indent(2000000000) }}",
    "{{ 'x'.ljust(2000000000) }}",
    "{{ '{:>2000000000}'.format(1) }}",
    "{{ '{:>{w}}'.format(1, w=2000000000) }}",
    "{{ ('x' * 100000).replace('', 'x' * 100000) }}",
    "{{ ('\t' * 1000).expandtabs(100000000) }}",
    "{{ [1]|slice(2000000000)|list }}",
    "{{ messages|tojson(indent=1000000000) }}",
    "{{ 'x'.translate({120: 'y' * 100000}) }}",
    "{{ (range(100000)|list)|join('x' * 100000) }}",
    "{{ ('a' * 100000)|wordwrap(1, wrapstring='x' * 100000) }}",
    "{{ lipsum(1000000000) }}",
    "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
    "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
    "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
    "{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "{% set ns = namespace(n=3) %}{% for i in range(64) %}{% set ns.n = ns.n * ns.n %}{% endfor %}",
    "{% set s %}{% for i in range(100000) %}{{ 'y' * 100000 }}{% endfor %}{% endset %}{{ s }}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    "{% for c in 'x' * 100000 %}{% for d in 'x' * 100000 %}{% endfor %}{% endfor %}",
    "{% macro f(n) %}{{ f(n) }}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    "{% set ns = namespace(l=[]) %}{% for i in range(2000) %}"
    "{% set ns.l = ns.l + [('x' * 1000000) ~ i] %}{% endfor %}",
    "{% set ns = namespace(d={}) %}{% set big = 'x' * 1000000 %}{% for i in range(2000) %}"
    "{% set ns.d = dict(ns.d, **{i|string: big|upper}) %}{% endfor %}",
]


@pytest.mark.parametrize("template", HOSTILE)
def test_hostile_template_is_stopped_quickly_and_small(template):
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(TemplateError):
            PromptBuilder(PromptSpec(), format_from_gguf(CONTENT + template, "evil"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.monotonic() - t0 < 10
    assert peak < 400 << 20, peak


def test_ordinary_templates_are_not_hindered():
    template = (
        "{% for m in messages %}{{ m['role'] ~ ': ' ~ m['content']|trim }}\n{% endfor %}"
        "{{ '%s words' % (messages|length) }}{{ 'x'.center(9) }}{{ ['a', 'b']|join(', ') }}"
    )
    builder = PromptBuilder(PromptSpec(), format_from_gguf(template, "fine"))
    long = "word " * 200_000  # a 1 MB prompt renders whole
    text = builder.build({"prompt": long})
    assert text.startswith("user: word") and len(text) > len(long) - 10
