"""llamba jobs on Ray Data, on a local Ray cluster started once for this module.

The CLI runs as a subprocess joining that cluster (`--address`), the way a user's
driver joins theirs; the Python API runs in this process.  Everything is kept small
(2 slots, a few tokens) because Ray itself is slow to start on two cores.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llamba_cli.errors import LlambaError
from llamba_cli.job.ray_data.actor import ActorFailure, EngineActor, reraise_actor_failure
from llamba_cli.job.spec import JobSpec
from tests.cli_process import REPO, llamba

pytest.importorskip(
    "ray.data", reason="Ray Data is not installed (the 'ray' extra: pip install 'llamba[ray]')"
)
import ray

# Ray Data's own context warns about its own deprecated settings when it is copied.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")

LABELS = ("positive", "negative")
TEMPLATE = "Review: {text}\nSentiment:"


@pytest.fixture(scope="module")
def cluster() -> str:
    """A 2-CPU local cluster; CLI subprocesses join it by address (and inherit the
    RAY_AUTH_MODE that `ray.init` sets in this process's environment)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def on_ray(address: str, *, actors: int = 2, block_rows: int = 8) -> list[str]:
    return [
        "--ray",
        "--address",
        address,
        "--actors",
        str(actors),
        "--threads-per-actor",
        "1",
        "--block-rows",
        str(block_rows),
    ]


def prompts_file(path: Path, n: int = 40) -> list[str]:
    """`n` rows: one is not JSON (its id is its row number), one has no prompt."""
    ids, lines = [], []
    for i in range(n):
        if i == 13:
            lines.append(b"{this is not json")
            ids.append("#13")
        elif i == 27:
            lines.append(orjson.dumps({"id": f"g{i:02d}", "topic": "no prompt here"}))
            ids.append(f"g{i:02d}")
        else:
            lines.append(orjson.dumps({"id": f"g{i:02d}", "prompt": f"Name {i} colours:"}))
            ids.append(f"g{i:02d}")
    path.write_bytes(b"\n".join(lines) + b"\n")
    return ids


def by_id(table: pa.Table) -> dict[str, dict]:
    rows = table.to_pylist()
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids)), "an id was written twice"
    return {row["id"]: row for row in rows}


def test_generate_40_rows_through_two_actors(cluster, tmp_path):
    src = tmp_path / "prompts.jsonl"
    ids = prompts_file(src)
    args = ["generate", str(src), "--slots", "2", "--max-tokens", "4", "--temperature", "0"]
    ray_out, local_out = tmp_path / "ray.parquet", tmp_path / "local.parquet"
    done = llamba(*args, "-o", str(ray_out), *on_ray(cluster))
    assert done.returncode == 1, done.stderr  # two rows ended in error, as locally
    assert "40 rows written" in done.stderr
    assert len(list(ray_out.glob("part-*.parquet"))) == 5  # one part per 8-row block
    local = llamba(*args, "-o", str(local_out))
    assert local.returncode == 1, local.stderr

    ray_table, local_table = pq.read_table(ray_out), pq.read_table(local_out)
    assert ray_table.column_names == local_table.column_names
    assert ray_table.schema.remove_metadata() == local_table.schema.remove_metadata()
    rows, local_rows = by_id(ray_table), by_id(local_table)
    assert sorted(rows) == sorted(ids)
    errors = {i: row["error"] for i, row in rows.items() if row["error"] is not None}
    assert errors == {i: row["error"] for i, row in local_rows.items() if row["error"]}
    assert set(errors) == {"#13", "g27"}
    assert all(rows[i]["finish_reason"] == "error" and rows[i]["text"] is None for i in errors)
    assert all(row["completion_tokens"] > 0 for i, row in rows.items() if i not in errors)
    assert ray.data.read_parquet(str(ray_out)).count() == 40  # the manifest is not read


def test_classify_job_file_on_ray_agrees_with_local_run(cluster, tmp_path):
    reviews = pq.read_table(REPO / "sample_data" / "reviews.parquet")
    broken = pa.table({"id": ["r_null"], "text": pa.nulls(1, pa.string()), "gold": [None]})
    src = tmp_path / "reviews.parquet"
    pq.write_table(pa.concat_tables([reviews, broken.cast(reviews.schema)]), src)
    job = (REPO / "jobs" / "classify.toml").read_text()
    job = job.replace('"../sample_data/reviews.parquet"', f'"{src}"')
    job_file = tmp_path / "classify.toml"
    job_file.write_text(job)

    ray_out, local_out = tmp_path / "ray.parquet", tmp_path / "local.parquet"
    done = llamba(
        "run", str(job_file), "-o", str(ray_out), "--slots", "2", *on_ray(cluster, block_rows=4)
    )
    assert done.returncode == 1, done.stderr
    local = llamba("run", str(job_file), "-o", str(local_out), "--slots", "1")
    assert local.returncode == 1, local.stderr

    ray_table, local_table = pq.read_table(ray_out), pq.read_table(local_out)
    assert ray_table.column_names == local_table.column_names
    rows, local_rows = by_id(ray_table), by_id(local_table)
    assert (
        sorted(rows) == sorted(local_rows) == sorted([*reviews.column("id").to_pylist(), "r_null"])
    )
    assert rows["r_null"]["error"] == local_rows["r_null"]["error"] is not None
    assert rows["r_null"]["label"] is None
    # Batch shapes differ (2 slots vs 1), so probabilities move a little; the argmax
    # is compared only where the local run is far from a tie.
    clear = [
        i for i, row in local_rows.items() if row["error"] is None and row["confidence"] > 0.75
    ]
    assert len(clear) >= 8, "too few clear-cut rows for the comparison to mean anything"
    for i in clear:
        assert rows[i]["label"] == local_rows[i]["label"], i
        assert rows[i]["p_positive"] + rows[i]["p_negative"] == pytest.approx(1.0)
        assert rows[i]["gold"] == local_rows[i]["gold"]


def one_actor_job(cluster: str, src: Path, out: Path) -> list[str]:
    """A generate job on one actor in small blocks, so it writes parts early."""
    args = ["generate", str(src), "-o", str(out), "--slots", "2", "--max-tokens", "12"]
    return args + on_ray(cluster, actors=1, block_rows=4)


def start_driver(args: list[str], *, stderr: int) -> subprocess.Popen[str]:
    """`llamba ARGS` as a process of its own, to be killed or to have its actor killed."""
    return subprocess.Popen(
        [sys.executable, "-m", "llamba_cli", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        text=True,
        env={**os.environ, "LLAMBA_PROGRESS": "off"},
    )


def test_killed_driver_then_rerun_writes_every_id_once(cluster, tmp_path):
    src = tmp_path / "prompts.jsonl"
    ids = prompts_file(src)
    out = tmp_path / "gen.jsonl"
    args = one_actor_job(cluster, src, out)
    driver = start_driver(args, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob("part-*.jsonl")) and time.monotonic() < deadline:
            assert driver.poll() is None, "the driver ended before writing a part"
            time.sleep(0.05)
        assert driver.poll() is None, "the job finished before it could be killed"
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.kill()
        driver.wait()
    written = sum(len(p.read_bytes().splitlines()) for p in out.glob("part-*.jsonl"))
    assert 0 < written < len(ids)

    again = llamba(*args)
    assert again.returncode == 1, again.stderr  # the two error rows
    assert f"{written} already done" in again.stderr
    rows = [orjson.loads(line) for p in out.glob("part-*.jsonl") for line in p.open("rb")]
    assert sorted(row["id"] for row in rows) == sorted(ids)  # every id, each once
    assert ray.data.read_json(str(out)).count() == len(ids)


def engine_actor_pids() -> list[int]:
    """Processes of this cluster's llamba actors (Ray titles them after the class)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            title = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if proc.name.isdigit() and b"MapBatches(EngineActor)" in title:
            pids.append(int(proc.name))
    return pids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the actor's process in /proc")
def test_killed_actor_is_replaced_and_every_id_written_once(cluster, tmp_path):
    src = tmp_path / "prompts.jsonl"
    ids = prompts_file(src)
    out = tmp_path / "gen.parquet"
    driver = start_driver(one_actor_job(cluster, src, out), stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob("part-*.parquet")) and time.monotonic() < deadline:
            time.sleep(0.05)
        actors = engine_actor_pids()
        assert driver.poll() is None and len(actors) == 1
        os.kill(actors[0], signal.SIGKILL)
        _, stderr = driver.communicate(timeout=300)
    finally:
        driver.kill()
    assert driver.returncode == 1, stderr  # the two error rows; no failure
    assert sorted(by_id(pq.read_table(out))) == sorted(ids)


def test_a_uri_input_is_read_by_ray_data(cluster, tmp_path):
    from llamba_cli.job.ray_data.runner import RayDataSource

    src = tmp_path / "reviews.csv"
    src.write_text("id,text,stars\n007,Great,5\nx2,,1\n")
    source = RayDataSource(f"file://{src}", None)
    assert source.columns == ["id", "text", "stars"] and source.id_column == "id"
    rows = list(source)
    # CSV values stay text, as a local run reads them ("007" is not 7).
    assert [(r.index, r.id, r.data, r.error) for r in rows] == [
        (0, "007", {"id": "007", "text": "Great", "stars": "5"}, None),
        (1, "x2", {"id": "x2", "text": "", "stars": "1"}, None),
    ]
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"]}), parquet)
    source = RayDataSource(f"file://{parquet}", None)
    assert [(r.id, r.data) for r in source] == [("#0", {"prompt": "a"}), ("#1", {"prompt": "b"})]


def test_python_api_on_an_in_memory_dataset(cluster):
    from llamba_cli.job.ray_data import map_dataset

    items = [
        {"id": "a", "text": "Absolutely love it, works perfectly."},
        {"id": "b", "text": "Broke on day one. Terrible."},
        {"id": "c", "text": None},  # becomes an error row
        {"id": "d", "text": "Great value and fast delivery."},
        {"id": "e", "text": "Awful smell and it leaks."},
    ]
    ds = ray.data.from_items(items)
    job = {"task": "classify", "labels": list(LABELS), "template": TEMPLATE, "slots": 2}
    result = map_dataset(ds, job, actors=2, batch_rows=2)
    rows = by_id(pa.Table.from_pylist(result.take_all()))
    assert sorted(rows) == ["a", "b", "c", "d", "e"]
    assert list(rows["a"]) == [
        "id",
        "label",
        "confidence",
        "p_positive",
        "p_negative",
        "logprob_positive",
        "logprob_negative",
        "prompt_tokens",
        "error",
    ]
    assert rows["c"]["error"] == "column 'text' is empty (null)" and rows["c"]["label"] is None
    for i in "abde":
        row = rows[i]
        assert row["error"] is None and row["label"] in LABELS
        assert row["p_positive"] + row["p_negative"] == pytest.approx(1.0)
        assert row["confidence"] == max(row["p_positive"], row["p_negative"])
        assert row["logprob_positive"] < 0 and row["logprob_negative"] < 0


def test_python_api_needs_an_id_column(cluster):
    from llamba_cli.job.ray_data import map_dataset

    ds = ray.data.from_items([{"prompt": "hello"}])
    with pytest.raises(LlambaError, match="needs an id column"):
        map_dataset(ds, {"task": "generate"})


def test_a_model_missing_on_the_actors_stops_the_job_with_one_line(cluster, tmp_path):
    from llamba_cli.job.models import resolve_model_path
    from llamba_cli.job.ray_data import map_dataset

    link = tmp_path / "model.gguf"
    os.link(resolve_model_path(None), link)  # readable where the job is checked ...
    result = map_dataset(
        ray.data.from_items([{"id": "x", "prompt": "Hi"}]), {"model": str(link), "task": "generate"}
    )
    link.unlink()  # ... and gone by the time the actors open it
    with pytest.raises(Exception) as raised:
        result.take_all()
    with pytest.raises(LlambaError) as error:
        reraise_actor_failure(raised.value)
    assert str(error.value).startswith(f"model file not found: {link} (on ")
    assert "\n" not in str(error.value)


def test_an_actor_that_cannot_open_the_model_reports_one_line(tmp_path):
    spec = JobSpec(task="generate", input="<ray dataset>", model=str(tmp_path / "missing.gguf"))
    actor = EngineActor(spec, ["id", "prompt"], None, threads=1)
    with pytest.raises(ActorFailure) as raised:
        actor(pa.table({"id": ["x"], "prompt": ["hi"]}))
    # Ray hands the driver the actor's error wrapped in its own text.
    wrapped = RuntimeError(f"ray::MapWorker failed:\n  {raised.value}\n  (more of Ray's text)")
    with pytest.raises(LlambaError) as error:
        reraise_actor_failure(wrapped)
    assert str(error.value).startswith(f"model file not found: {tmp_path / 'missing.gguf'} (on ")
    assert error.value.exit_code == 2


def test_an_actor_keeps_the_configured_slots_for_every_batch():
    """One engine serves all of an actor's batches, so it is not sized to the rows
    it holds when it is made (none): the job's slots and KV cache, as configured."""
    spec = JobSpec(task="generate", input="<ray dataset>")
    spec = dataclasses.replace(spec, engine=dataclasses.replace(spec.engine, slots=3))
    actor = EngineActor(spec, ["id", "prompt"], None, threads=1)
    try:
        config = actor.engine.config
        assert (config.slots, config.kv_cells, config.prefix_cache) == (3, None, True)
        out = actor(pa.table({"id": ["a", "b"], "prompt": ["Hi", "Hello"]}))
        assert out.num_rows == 2
    finally:
        actor.engine.close()
