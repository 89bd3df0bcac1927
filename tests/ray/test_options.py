"""The Ray options of the CLI, where Ray is not needed to check them."""

from __future__ import annotations

from tests.cli_process import llamba


def test_ray_options_need_ray():
    done = llamba("generate", "sample_data/prompts.jsonl", "-o", "x.parquet", "--actors", "2")
    assert done.returncode == 2
    assert done.stderr.strip() == "llamba: error: --actors applies only with --ray"


def test_validate_has_no_ray_options():
    done = llamba("validate", "jobs/generate.toml", "--ray")
    assert done.returncode == 2
    assert "No such option: --ray" in done.stderr
