"""Prompt formats and PromptBuilder: exact renderings, row handling, sandboxing."""

from __future__ import annotations

from pathlib import Path

import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llamba_cli.errors import ConfigError, RowError, TemplateError
from llamba_cli.job import sandbox
from llamba_cli.job.formats import PromptFormat, format_from_gguf, list_formats, load_format
from llamba_cli.job.prompts import PromptBuilder, PromptSpec

TWO_TURNS = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "How are you?"},
]

# What each packaged format makes of TWO_TURNS, written out in full.
EXPECTED_TWO_TURNS = {
    "plain": "Hi\n\nHello!\n\nHow are you?",
    "chatml": (
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nHow are you?<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    "llama3": (
        "<|begin_of_text|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHow are you?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "gemma": (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nHow are you?<end_of_turn>\n"
        "<start_of_turn>model\n"
    ),
    "mistral": "<s> [INST] Hi [/INST] Hello!</s> [INST] How are you? [/INST]",
}

BOS = {"plain": "", "chatml": "", "llama3": "<|begin_of_text|>", "gemma": "<bos>", "mistral": "<s>"}
EOS = {"plain": "", "chatml": "", "llama3": "<|eot_id|>", "gemma": "<eos>", "mistral": "</s>"}


def builder(fmt: str | PromptFormat = "plain", **spec: str) -> PromptBuilder:
    loaded = load_format(fmt) if isinstance(fmt, str) else fmt
    name = loaded.name
    return PromptBuilder(
        PromptSpec(**spec), loaded, bos_token=BOS.get(name, ""), eos_token=EOS.get(name, "")
    )


# --- packaged formats ---------------------------------------------------------------


def test_packaged_formats_are_listed() -> None:
    assert set(EXPECTED_TWO_TURNS) <= set(list_formats())


@pytest.mark.parametrize("name", sorted(EXPECTED_TWO_TURNS))
def test_format_renders_two_turns_exactly(name: str) -> None:
    fmt = load_format(name)
    assert fmt.name == name
    assert fmt.description
    assert builder(name).build({"messages": TWO_TURNS}) == EXPECTED_TWO_TURNS[name]


def test_every_listed_format_loads_and_builds() -> None:
    for name in list_formats():
        assert "Hi" in builder(name).build({"prompt": "Hi"})


def test_stop_strings() -> None:
    assert load_format("chatml").stop == ("<|im_end|>",)
    assert load_format("llama3").stop == ("<|eot_id|>",)
    assert load_format("gemma").stop == ("<end_of_turn>",)
    assert load_format("plain").stop == ()


@pytest.mark.parametrize(
    "prompt", ["Review: great film\nLabel:", "  leading and trailing space \n", "{x} {{y}}"]
)
def test_plain_is_the_identity_on_a_prompt(prompt: str) -> None:
    assert builder("plain").build({"prompt": prompt}) == prompt


def test_chatml_single_prompt() -> None:
    assert builder("chatml").build({"prompt": "2+2?"}) == (
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    )


# --- system message placement -------------------------------------------------------


def test_system_is_a_chatml_turn() -> None:
    assert builder("chatml", system="Be brief.").build({"prompt": "Hi"}) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_system_is_folded_into_the_first_gemma_user_turn() -> None:
    assert builder("gemma", system="Be brief.").build({"messages": TWO_TURNS}) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nHow are you?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_system_is_a_leading_paragraph_in_plain() -> None:
    assert builder("plain", system="You label reviews.").build({"prompt": "Great!"}) == (
        "You label reviews.\n\nGreat!"
    )


def test_system_in_llama3_and_mistral() -> None:
    assert builder("llama3", system="S").build({"prompt": "U"}) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert builder("mistral", system="S").build({"prompt": "U"}) == "<s> [INST] S\n\nU [/INST]"


def test_row_system_message_wins_over_spec_system() -> None:
    row = {"messages": [{"role": "system", "content": "Row system."}, *TWO_TURNS[:1]]}
    assert builder("chatml", system="Spec system.").build(row) == (
        "<|im_start|>system\nRow system.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_empty_system_means_none() -> None:
    assert builder("plain", system="").build({"prompt": "Hi"}) == "Hi"


# --- --template -----------------------------------------------------------------------


def test_template_fills_columns_and_keeps_doubled_braces_literal() -> None:
    b = builder("plain", template='Review: {text}\nStars: {stars}\nJSON: {{"label": ?}}')
    assert b.build({"text": "Loved it", "stars": 5, "other": "x"}) == (
        'Review: Loved it\nStars: 5\nJSON: {"label": ?}'
    )


def test_template_wins_over_prompt_column() -> None:
    b = builder("plain", template="T: {text}")
    assert b.build({"text": "a", "prompt": "ignored"}) == "T: a"


@pytest.mark.parametrize(
    "template", ["{a.b}", "{a[0]}", "{0}", "{}", "{x!r}", "{x:>10}", "unbalanced {x", "x } y"]
)
def test_template_rejects_everything_but_plain_fields(template: str) -> None:
    with pytest.raises(ConfigError, match="--template"):
        PromptSpec(template=template)


def test_template_cell_problems_are_row_errors() -> None:
    b = builder("plain", template="Review: {text}")
    with pytest.raises(RowError, match="'text'"):
        b.build({"other": "x"})
    with pytest.raises(RowError, match="null"):
        b.build({"text": None})
    with pytest.raises(RowError, match="list"):
        b.build({"text": ["a"]})


# --- check_columns ------------------------------------------------------------------


def test_check_columns_names_the_missing_template_column() -> None:
    b = builder("plain", template="{title}: {body}")
    b.check_columns(["title", "body", "id"])
    with pytest.raises(ConfigError, match=r"'body'.*columns: title, id"):
        b.check_columns(["title", "id"])


def test_check_columns_needs_prompt_or_messages() -> None:
    b = builder("plain", prompt_column="question")
    b.check_columns(["question"])
    b.check_columns(["messages"])
    with pytest.raises(ConfigError, match=r"'question'.*'messages'.*columns: text, id"):
        b.check_columns(["text", "id"])


# --- bad rows -----------------------------------------------------------------------


def test_row_without_prompt_or_messages_is_a_row_error() -> None:
    with pytest.raises(RowError, match=r"'prompt'.*'messages'"):
        builder().build({"text": "hello"})
    with pytest.raises(RowError, match=r"'prompt'.*'messages'"):
        builder().build({"prompt": None})


@pytest.mark.parametrize("prompt", [3, ["a"], ""])
def test_non_string_or_empty_prompt_is_a_row_error(prompt: object) -> None:
    with pytest.raises(RowError, match="'prompt'"):
        builder().build({"prompt": prompt})


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ([], "non-empty list"),
        ("not json", "JSON"),
        ({"role": "user", "content": "x"}, "non-empty list"),
        (["hi"], r"messages\[0\] is a str"),
        ([{"role": "robot", "content": "x"}], "role 'robot'"),
        ([{"content": "x"}], "role None"),
        ([{"role": "user", "content": 5}], "content is a int"),
        ([{"role": "user"}], "content is a NoneType"),
    ],
)
def test_malformed_messages_are_row_errors(messages: object, problem: str) -> None:
    with pytest.raises(RowError, match=problem):
        builder("chatml").build({"messages": messages})


def test_messages_as_json_text_are_accepted() -> None:
    row = {"messages": '[{"role": "user", "content": "Hi"}]'}
    assert builder("plain").build(row) == "Hi"


def test_template_raise_exception_is_a_row_error() -> None:
    two_users = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    b = builder("gemma")
    with pytest.raises(RowError, match="roles must alternate"):
        b.build({"messages": two_users})
    # The job goes on: the next row still builds.
    assert b.build({"prompt": "ok"}).endswith("ok<end_of_turn>\n<start_of_turn>model\n")


# --- loading --------------------------------------------------------------------------


def test_unknown_format_lists_available_names() -> None:
    with pytest.raises(ConfigError, match=r"'nope'.*chatml.*gemma.*llama3.*mistral.*plain"):
        load_format("nope")


def test_format_name_cannot_escape_the_formats_directory() -> None:
    with pytest.raises(ConfigError, match="unknown prompt format"):
        load_format("..")


def test_load_format_from_a_toml_path(tmp_path: Path) -> None:
    path = tmp_path / "qa.toml"
    path.write_text(
        r"""
description = "Q/A"
template = '''
{%- for m in messages %}
    {{- m['role'] + ': ' + m['content'] + '\n' }}
{%- endfor %}
{%- if add_generation_prompt %}assistant:{% endif %}
'''
stop = ["\nuser:"]
""",
        encoding="utf-8",
    )
    fmt = load_format(str(path))
    assert fmt == PromptFormat(
        name="qa",
        template=fmt.template,
        stop=("\nuser:",),
        description="Q/A",
    )
    assert builder(fmt).build({"prompt": "2+2?"}) == "user: 2+2?\nassistant:"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('template = "x"\nstops = []\n', "unknown key"),
        ("stop = []\n", "'template'"),
        ('template = "x"\nstop = "END"\n', "'stop'"),
        ("template = \n", "not valid TOML"),
    ],
)
def test_malformed_format_file_is_a_template_error(
    tmp_path: Path, content: str, problem: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(TemplateError, match=problem):
        load_format(str(path))


def test_missing_format_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_format(str(tmp_path / "absent.toml"))


def test_template_that_does_not_compile_names_the_format() -> None:
    with pytest.raises(TemplateError, match="'broken' does not compile"):
        builder(format_from_gguf("{% for m in messages %}", name="broken"))


def test_template_ignoring_messages_is_refused() -> None:
    with pytest.raises(TemplateError, match="content"):
        builder(format_from_gguf("{{ messages.content }}"))


def test_template_that_fails_on_a_plain_prompt_is_refused_up_front() -> None:
    no_system = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    builder(format_from_gguf(no_system))
    with pytest.raises(TemplateError, match="System role not supported"):
        builder(format_from_gguf(no_system), system="Be brief.")


def test_gguf_template_with_hugging_face_helpers() -> None:
    fmt = format_from_gguf(
        "{{ bos_token }}{% for m in messages %}{{ m | tojson }}{% endfor %}"
        "{% if strftime_now('%Y') | int > 2000 %}!{% endif %}"
    )
    assert builder(fmt).build({"prompt": "é"}) == '{"role": "user", "content": "é"}!'


def test_empty_gguf_template_is_refused() -> None:
    with pytest.raises(TemplateError, match="empty"):
        format_from_gguf("  \n")


# --- sandbox ----------------------------------------------------------------------------

MALICIOUS_TEMPLATES = [
    # The classic escape: walk from a str to object's subclasses (CVE-2024-34359).
    "{{ ''.__class__.__mro__[1].__subclasses__() }}{{ messages[0]['content'] }}",
    "{% for c in ''.__class__.__mro__[1].__subclasses__() %}{% endfor %}"
    "{{ messages[0]['content'] }}",
    # Through a global's function object to its module's globals.
    "{{ cycler.__init__.__globals__.os.getcwd() }}{{ messages[0]['content'] }}",
    "{{ messages[0]['content'] }}{{ (messages | attr('__class__')).__base__ }}",
    "{{ messages[0]['content'] }}{{ '{0.__class__}'.format(messages) }}",
    # Hidden behind a condition the one-message check does not meet: caught per row.
    "{{ messages[-1]['content'] }}{% if messages | length > 1 %}"
    "{{ raise_exception.__globals__ }}{% endif %}",
]


@pytest.mark.parametrize("source", MALICIOUS_TEMPLATES)
def test_template_reaching_for_python_internals_is_stopped(source: str) -> None:
    fmt = format_from_gguf(source, name="evil")
    with pytest.raises(TemplateError, match=r"'evil'.*unsafe"):
        builder(fmt).build({"messages": TWO_TURNS})


def test_malicious_template_executes_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = (
        "{{ messages[0]['content'] }}"
        f"{{{{ cycler.__init__.__globals__.os.system('touch {marker}') }}}}"
    )
    # The payload does run code outside a sandbox, so the check below can fail.
    jinja2.Environment().from_string(payload).render(messages=[{"content": "x"}])
    assert marker.exists()
    marker.unlink()

    with pytest.raises(TemplateError, match="unsafe"):
        builder(format_from_gguf(payload, name="evil")).build({"prompt": "Hi"})
    assert not marker.exists()


def test_malicious_template_cannot_call_module_functions(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def sentinel() -> str:
        calls.append("called")
        return ""

    monkeypatch.setattr(sandbox, "sentinel", sentinel, raising=False)
    payload = "{{ messages[0]['content'] }}{{ raise_exception.__globals__['sentinel']() }}"
    # `raise_exception` is defined in the sandbox module, so outside a sandbox its
    # globals are that module's, sentinel included.
    assert sandbox._raise_exception.__globals__["sentinel"] is sentinel

    with pytest.raises(TemplateError, match="unsafe"):
        builder(format_from_gguf(payload))
    assert calls == []


def test_plain_sandbox_would_have_rendered_the_probe_silently() -> None:
    # Why the strict sandbox exists: Jinja's own answers an unsafe access with "".
    source = "{{ messages[0]['content'] }}{{ ''.__class__ }}"
    quiet = ImmutableSandboxedEnvironment().from_string(source)
    assert quiet.render(messages=[{"content": "x"}]) == "x"
    with pytest.raises(TemplateError, match="unsafe"):
        builder(format_from_gguf(source))


def test_immutable_sandbox_refuses_mutating_messages() -> None:
    fmt = format_from_gguf(
        "{{ messages[0]['content'] }}{% if messages | length > 1 %}"
        "{{ messages.append({'role': 'user', 'content': 'x'}) }}{% endif %}",
        "mutating",
    )
    b = builder(fmt)
    with pytest.raises(TemplateError, match="unsafe"):
        b.build({"messages": TWO_TURNS})
    assert len(TWO_TURNS) == 3
