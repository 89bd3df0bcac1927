"""The engine is sized to the work when the input says how much there is."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from llamba_cli.engine import EngineConfig, Model
from llamba_cli.job.checks import dry_run, validate_job
from llamba_cli.job.execute import Job
from llamba_cli.job.spec import build_spec


def test_sized_for_caps_slots_and_drops_an_unshareable_prefix_cache():
    config = EngineConfig(model_path="m.gguf", slots=16, n_ctx_seq=256)
    one = config.sized_for(1)
    assert (one.slots, one.prefix_cache, one.n_ctx) == (1, False, 256)
    three = config.sized_for(3)
    assert (three.slots, three.prefix_cache) == (3, True)
    assert three.n_ctx == 3 * 256 + config.prefix_cache_tokens
    assert config.sized_for(None) is config  # unknown: as configured
    assert config.sized_for(100) is config  # more work than slots
    assert config.sized_for(0).slots == 1
    fixed = EngineConfig(model_path="m.gguf", kv_cells=4096)
    assert fixed.sized_for(1) is fixed  # an explicit KV size is kept


def write_rows(path: Path, n: int) -> Path:
    path.write_bytes(
        b"".join(orjson.dumps({"id": f"r{i}", "prompt": f"Say {i}."}) + b"\n" for i in range(n))
    )
    return path


@pytest.mark.parametrize(
    ("rows", "extra", "slots", "prefix_cache"),
    [
        (1, {}, 1, False),
        (3, {}, 3, True),
        (3, {"n": 2}, 6, True),  # samples are sequences too
        (40, {}, 16, True),
        (40, {"limit": 2}, 2, True),
    ],
)
def test_job_sizes_the_engine_to_its_rows(
    tmp_path: Path, model: Model, rows: int, extra: dict, slots: int, prefix_cache: bool
) -> None:
    src = write_rows(tmp_path / "in.jsonl", rows)
    spec = build_spec({"task": "generate", "input": str(src), "slots": 16, **extra})
    job = Job(spec, model=model)
    config = job.engine_config()
    assert (config.slots, config.prefix_cache) == (slots, prefix_cache)
    assert f"{slots} slot" in job.allocation()


def test_unknown_row_count_keeps_the_configured_slots(tmp_path: Path, model: Model) -> None:
    src = tmp_path / "in.csv"
    src.write_text("id,prompt\na,Say a.\n")
    spec = build_spec({"task": "generate", "input": str(src), "slots": 8})
    job = Job(spec, model=model)
    if job.source.count_rows() is None:
        assert job.engine_config().slots == 8
    else:  # pragma: no cover - a reader that learns to count
        assert job.engine_config().slots == 1


def test_validate_and_dry_run_say_what_a_run_allocates(tmp_path: Path, model: Model) -> None:
    src = write_rows(tmp_path / "in.jsonl", 1)
    spec = build_spec({"task": "generate", "input": str(src), "ctx": 512})
    report = validate_job(spec, model=model)
    per_cell = model.kv_bytes_per_cell()
    assert per_cell > 0
    mib = 512 * per_cell / (1 << 20)
    assert f"engine: 1 slot x 512 tokens (--ctx), KV cache 512 cells, about {mib:.0f} MiB" in (
        report.lines()
    )
    notes: list[str] = []
    rows = list(dry_run(spec, notes=notes, model=model))
    assert [r[0] for r in rows] == ["r0"]
    assert notes == [f"engine: {report.allocation}"]
    # dry-run shows five rows by default but sizes for the whole input
    many = write_rows(tmp_path / "many.jsonl", 9)
    spec = build_spec({"task": "generate", "input": str(many), "slots": 16})
    notes = []
    rows = list(dry_run(spec, notes=notes, model=model))
    assert len(rows) == 5 and notes[0].startswith("engine: 9 slots")
