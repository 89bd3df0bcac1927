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


def test_sized_for_bounds_the_kv_cache_by_the_cells_the_work_can_fill():
    config = EngineConfig(model_path="m.gguf", slots=16, n_ctx_seq=2048)
    assert config.sized_for(1, cells=40).n_ctx == 256  # llama.cpp's step
    assert config.sized_for(1, cells=257).n_ctx == 512
    assert config.sized_for(1, cells=5000).n_ctx == 2048  # never more than configured
    assert config.sized_for(1, cells=5000).kv_cells is None
    three = config.sized_for(3, cells=700)
    assert (three.slots, three.prefix_cache, three.n_ctx) == (3, True, 768)
    assert config.sized_for(None, cells=10) is config  # unknown work: as configured


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


@pytest.mark.parametrize(
    ("rows", "extra"),
    [
        ([{"prompt": "Say hi."}], {"max_tokens": 16}),
        ([{"prompt": "Schnee fällt 雪が降る ❄️ " * 30}], {"max_tokens": 3}),
        ([{"prompt": f"Count to {i}."} for i in range(3)], {"n": 2}),
        (
            [{"prompt": "Review: great phone, awful battery. Sentiment:"}] * 2,
            {"task": "classify", "labels": ["very positive", "mixed feelings", "négatif"]},
        ),
    ],
)
def test_planned_cells_cover_what_the_sequences_hold(
    tmp_path: Path, model: Model, rows: list[dict], extra: dict
) -> None:
    """The read-ahead bound is at least the tokens the run's sequences really hold:
    the prompt as the model tokenizes it, then the completion or the longest label
    (and the prompts again for the prefix cache when there is more than one)."""
    src = tmp_path / "in.jsonl"
    lines = (orjson.dumps({"id": f"r{i}", **r}) + b"\n" for i, r in enumerate(rows))
    src.write_bytes(b"".join(lines))
    spec = build_spec({"task": "generate", "input": str(src), "slots": 16, **extra})
    job = Job(spec, model=model)
    held = prompts = 0
    for i in range(len(rows)):
        row = next(r for r in job.source if r.id == f"r{i}")
        text = job.prompt(row)
        ptoks = len(model.tokenize(text))
        if job.labels is not None:
            joined = [text + spec.label_delimiter + label for label in job.labels]
            held += max(len(model.tokenize(t)) for t in joined)
        else:
            held += spec.n * (ptoks + spec.sampling.max_tokens)
        prompts += spec.n * ptoks
    real = held + (prompts if len(rows) * spec.n > 1 else 0)
    planned = job.planned_cells()
    assert real <= planned
    config = job.engine_config()
    assert config.n_ctx >= real and (config.kv_cells is None or config.n_ctx % 256 == 0)


def test_a_kv_cache_sized_to_the_work_gives_the_same_tokens(model: Model) -> None:
    """Fewer KV cells than `--ctx` change no computation: llama.cpp attends over the
    cells in use (in steps of 256) either way."""
    from llamba_cli.engine import Engine, Request, SamplingParams

    base = EngineConfig(
        model_path=str(model.path), slots=1, n_ctx_seq=2048, n_threads=2, prefix_cache=False
    )
    texts = []
    for config in (base, base.sized_for(1, cells=40)):
        engine = Engine(config, model=model)
        try:
            params = SamplingParams(temperature=0.0, max_tokens=16)
            (done,) = engine.run([Request(id=0, prompt="The first snow of winter", params=params)])
            texts.append((engine.ctx.n_ctx, done.tokens))
        finally:
            engine.close()
    (n_big, big), (n_small, small) = texts
    assert (n_big, n_small) == (2048, 256)
    assert small == big and len(small) > 16
