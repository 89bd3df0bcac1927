"""The job spec nests the engine's config classes; every setting has one flat name."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from llamba_cli.cli.options import OPTIONS
from llamba_cli.engine import EngineConfig, SamplingParams
from llamba_cli.errors import ConfigError
from llamba_cli.job.spec import SETTINGS, JobSpec, build_spec, load_job_file

NOT_SETTINGS = {"model_path", "seed", "logit_bias"}
RENAMED = {"n_ctx_seq": "ctx", "n_threads": "threads"}


@pytest.mark.parametrize("cls,section", [(SamplingParams, "sampling"), (EngineConfig, "engine")])
def test_every_field_of_the_engine_classes_is_a_setting_and_a_flag(cls, section):
    for f in dataclasses.fields(cls):
        if f.name in NOT_SETTINGS:
            continue
        key = RENAMED.get(f.name, f.name)
        assert SETTINGS[key].section == section and SETTINGS[key].field == f.name
        assert key in OPTIONS, key


def test_defaults_are_the_engine_classes_own():
    spec = JobSpec(task="generate", input="x.jsonl")
    assert spec.sampling == SamplingParams()
    assert dataclasses.replace(spec.engine, n_threads=1) == EngineConfig(model_path="", n_threads=1)


def test_flat_settings_land_in_their_sections():
    spec = build_spec(
        {"task": "generate", "input": "x.jsonl", "temperature": 0, "stop": ["a", "b"],
         "ctx": 128, "threads": 3, "repack": "off", "prefix_cache": False, "seed": 7}
    )  # fmt: skip
    assert spec.sampling.temperature == 0.0 and spec.sampling.stop == ("a", "b")
    assert spec.engine.n_ctx_seq == 128 == spec.ctx and spec.engine.n_threads == 3
    assert spec.engine.repack is False and spec.engine.prefix_cache is False
    assert spec.seed == 7 and spec.sampling.seed is None  # rows are seeded by the job
    assert spec.engine_config("m.gguf").model_path == "m.gguf"
    row = spec.row_sampling(42, extra_stop=("b", "<end>"))
    assert row.seed == 42 and row.stop == ("a", "b", "<end>")


@pytest.mark.parametrize(
    "values,message",
    [
        ({"repack": "maybe"}, "repack must be auto, on or off"),
        ({"temperature": "hot"}, "temperature must be a number"),
        ({"ctx": 8}, "ctx must be at least 16"),
        ({"n_batch": 16}, "n-batch (16) must be at least 24"),
        ({"bogus": 1}, "unknown job setting"),
        ({"lookahead": 0}, "lookahead must be >= 1"),
    ],
)
def test_bad_values_are_config_errors(values, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_spec({"task": "generate", "input": "x.jsonl", **values})


def test_job_file_tables_and_renamed_keys(tmp_path: Path):
    job = tmp_path / "job.toml"
    job.write_text(
        'task = "generate"\ninput = "in.jsonl"\n[sampling]\ntemperature = 0.5\nmax_tokens = 9\n'
        '[engine]\nctx = 256\nrepack = "on"\nthreads = 2\n'
    )
    spec = build_spec(load_job_file(job))
    assert spec.sampling.max_tokens == 9 and spec.engine.n_ctx_seq == 256
    assert spec.engine.repack is True and spec.engine.n_threads == 2
    assert spec.input == str(tmp_path / "in.jsonl")


def test_fingerprint_covers_sampling_id_column_and_context():
    base = build_spec({"task": "generate", "input": "x.jsonl"})
    fp = base.fingerprint({"name": "m"}, "plain")
    for change in ({"id_column": "key"}, {"ctx": 512}, {"repeat_last_n": 8}):
        other = build_spec({"task": "generate", "input": "x.jsonl", **change})
        assert other.fingerprint({"name": "m"}, "plain") != fp, change
