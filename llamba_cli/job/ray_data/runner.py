"""`llamba ... --ray`: a job run on a Ray cluster, written to a folder of parts.

The driver (the process running `llamba`) checks the job as a local run does, then
reads the input in order with llamba's own reader (a local or shared path) or with
Ray Data's readers (a `scheme://` URI), keeping only the rows this run needs (shard,
duplicate ids, rows already done, `--limit`).  It hands them to the cluster in
blocks of `block_rows` rows; an actor pool maps each block through one `Engine`
per actor (`EngineActor`), and the driver writes each finished block as one part of
the output folder (`PartFolder`) as it arrives.  Killing the driver or an actor at
any moment loses only blocks not yet written; rerunning the same command skips the
ids already in the folder, so every id ends up there exactly once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from llamba_cli.errors import ConfigError, LlambaError
from llamba_cli.job.execute import Job
from llamba_cli.job.models import resolve_model_path
from llamba_cli.job.ray_data.actor import (
    EVALUATED_COLUMN,
    INTERNAL_COLUMNS,
    REUSED_COLUMN,
    EngineActor,
    encode_rows,
    errors_of,
    jsonl_payload,
    pack_files,
    reraise_actor_failure,
)
from llamba_cli.job.ray_data.options import RayOptions
from llamba_cli.job.ray_data.parts import PartFolder, output_format
from llamba_cli.job.readers import InputRow, InputSource
from llamba_cli.job.spec import JobSpec
from llamba_cli.job.summary import JobSummary, NoProgress, ProgressSink, write_metrics

if TYPE_CHECKING:
    from llamba_cli.job.store import OutputStore

INSTALL_HINT = "--ray needs Ray Data: pip install 'llamba[ray]'"
BLOCKS_PER_SLOT = 8  # default block: 8 rows per slot keeps the engine full past its tail


def import_ray() -> Any:
    """The `ray` module with Ray Data, or ConfigError saying how to install it."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return ray


def connect(address: str | None) -> Any:
    """Join (or start) a Ray cluster, quietly: Ray's own logs stay in its log folder."""
    ray = import_ray()
    if not ray.is_initialized():
        try:
            ray.init(
                address=address,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.ERROR,
            )
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = address or os.environ.get("RAY_ADDRESS") or "a new local instance"
            raise ConfigError(f"cannot connect to Ray ({where}): {_first_line(e)}") from None
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    if hasattr(context, "print_on_execution_start"):
        context.print_on_execution_start = False
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return ray


def actor_model_spec(spec: JobSpec) -> JobSpec:
    """`spec` with the model path every actor must open: the one the driver resolved,
    except for the embedded model, which each node resolves in its own cache."""
    chosen = spec.model or os.environ.get("LLAMBA_MODEL")
    if chosen:
        return dataclasses.replace(spec, model=str(resolve_model_path(chosen).resolve()))
    return spec


def default_block_rows(spec: JobSpec) -> int:
    return max(16, BLOCKS_PER_SLOT * spec.engine.slots)


def run_ray_job(
    spec: JobSpec, options: RayOptions, progress: ProgressSink | None = None
) -> JobSummary:
    """Run `spec` on Ray, writing its output folder; the contract of `run_job`
    (LlambaError before any row runs, error rows, exit codes) otherwise."""
    progress = progress or NoProgress()
    if not spec.output:
        raise ConfigError("an output path is needed: -o/--output FOLDER (.parquet or .jsonl)")
    output = spec.output
    fmt = output_format(output)
    ray = import_ray()
    spec = actor_model_spec(spec)
    uri = _is_uri(spec.input)
    owned = not ray.is_initialized()  # joined here, so left here (not a caller's session)
    folder: PartFolder | None = None
    try:
        if uri:
            connect(options.address)  # Ray Data reads the input
        job = Job(spec, source=RayDataSource(spec.input, spec.id_column) if uri else None)
        job.model.close()  # the driver only checks the job; each actor loads its own
        connect(options.address)  # before the output is touched
        folder = PartFolder(
            output,
            fingerprint=job.fingerprint,
            overwrite=spec.overwrite,
            retry_errors=spec.retry_errors,
        )
        summary = JobSummary(task=spec.task, output=str(folder.path), fingerprint=job.fingerprint)
        if folder.done_count:
            progress.note(f"resuming: {folder.done_count} rows already in {folder.path.name}")
        t0 = time.perf_counter()
        block_rows = options.block_rows or default_block_rows(spec)
        blocks: list[Any] = []
        rows = 0
        for block in _blocks(job, folder, summary, block_rows):
            blocks.append(ray.put(encode_rows(block)))
            rows += len(block)
        progress.start(rows * spec.n, "samples" if spec.n > 1 else "rows")
        if blocks:
            _map_blocks(ray, job, blocks, options, fmt, folder, summary, progress)
        summary.wall_seconds = time.perf_counter() - t0
        if not summary.aborted:
            folder.finish()
    except Exception as e:
        reraise_actor_failure(e)
        if ray.is_initialized() and isinstance(e, ray.exceptions.RayError):
            raise LlambaError(f"the Ray job failed: {_first_line(e)}") from None
        raise
    finally:
        if folder is not None:
            folder.close()
        if owned and ray.is_initialized():
            ray.shutdown()
    summary.errors_fail = spec.max_errors is None and summary.errors > 0
    if spec.metrics_json:
        write_metrics(spec.metrics_json, summary)
    return summary


def _blocks(
    job: Job, folder: PartFolder, summary: JobSummary, block_rows: int
) -> Iterator[list[InputRow]]:
    block: list[InputRow] = []
    # `Job.rows` asks the store only `is_done`, which the folder answers.
    for row in job.rows(cast("OutputStore", folder), summary):
        block.append(row)
        if len(block) >= block_rows:
            yield block
            block = []
    if block:
        yield block


def _map_blocks(
    ray: Any,
    job: Job,
    blocks: list[Any],
    options: RayOptions,
    fmt: str,
    folder: PartFolder,
    summary: JobSummary,
    progress: ProgressSink,
) -> None:
    spec = job.spec
    actors, threads = _pool_size(ray, options, spec, len(blocks))
    dataset = ray.data.from_arrow_refs(blocks)
    results = dataset.map_batches(
        EngineActor,
        fn_constructor_kwargs={
            "spec": spec,
            "columns": job.source.columns,
            "id_column": job.source.id_column,
            "output_format": fmt,
            "schema": job.output_schema(),
            "threads": threads,
            "fingerprint": job.fingerprint,
            "files": pack_files(spec),
            "internal_columns": True,
        },
        batch_size=None,  # one block per call: one output part per block
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=threads,
        # Ray Data restarts an actor that dies and runs its block again (its defaults:
        # max_restarts=-1, max_task_retries=-1); the driver writes a block only once.
    )
    for table in results.iter_batches(batch_size=None, batch_format="pyarrow"):
        if table.num_rows == 0:
            continue
        ids = [str(v) for v in table.column("id").to_pylist()]
        errors = errors_of(table)
        summary.prompt_tokens_evaluated += int(table.column(EVALUATED_COLUMN)[0].as_py())
        summary.prompt_tokens_reused += int(table.column(REUSED_COLUMN)[0].as_py())
        tokens = _column_sum(table, "completion_tokens")
        summary.prompt_tokens += _column_sum(table, "prompt_tokens")
        summary.generated_tokens += tokens
        if fmt == "jsonl":
            payload: Any = jsonl_payload(table)
        else:
            payload = table.drop_columns([c for c in INTERNAL_COLUMNS if c in table.column_names])
        folder.write_part(ids, errors, payload)
        failed = int(errors.sum())
        summary.rows_written += len(ids)
        summary.errors += failed
        progress.advance(len(ids), failed, tokens)
        if spec.max_errors is not None and summary.errors > spec.max_errors:
            summary.aborted = f"more than {spec.max_errors} rows ended in error (--max-errors)"
            return


def _pool_size(ray: Any, options: RayOptions, spec: JobSpec, blocks: int) -> tuple[int, int]:
    """(actors, threads per actor) that fit the cluster's CPUs."""
    cpus = [int(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node.get("Alive")]
    total, largest = sum(cpus), max(cpus, default=0)
    threads = options.threads_per_actor
    if threads is None:
        threads = max(1, total // options.actors) if options.actors else min(largest, 8)
    if threads > largest:
        raise ConfigError(
            f"--threads-per-actor {threads}: no node of the cluster has that many CPUs"
            f" (the largest has {largest})"
        )
    actors = options.actors or max(1, total // threads)
    if actors * threads > total:
        raise ConfigError(
            f"{actors} actors x {threads} threads need {actors * threads} CPUs;"
            f" the cluster has {total} (lower --actors or --threads-per-actor)"
        )
    return min(actors, blocks), threads


def _column_sum(table: Any, name: str) -> int:
    if name not in table.column_names:
        return 0
    import pyarrow.compute as pc

    value = pc.sum(table.column(name)).as_py()
    return int(value or 0)


class RayDataSource(InputSource):
    """An input at a `scheme://` URI (s3, gs, hdfs, ...), read in order by Ray Data.

    Rows are numbered in the order read; their ids come from the id column when the
    input has one (give one: without it, ids are those numbers).  A file Ray Data
    cannot parse stops the job; CSV values are read as text, as a local run does.
    """

    def __init__(self, uri: str, id_column: str | None) -> None:
        self.uri = uri
        super().__init__(Path(uri), id_column=id_column, batch_rows=1024)

    def _read_columns(self) -> list[str]:
        ray = import_ray()
        uri = self.uri
        name = uri.lower().removesuffix(".gz")
        try:
            if name.endswith((".parquet", ".pq")):
                self.dataset = ray.data.read_parquet(uri)
            elif name.endswith(".csv"):
                import pyarrow.csv as pacsv

                header = ray.data.read_csv(uri).columns()
                as_text = pacsv.ConvertOptions(
                    column_types=dict.fromkeys(header, "string"),
                    strings_can_be_null=False,
                    null_values=[],
                )
                self.dataset = ray.data.read_csv(uri, convert_options=as_text)
            elif name.endswith((".jsonl", ".ndjson", ".json")):
                self.dataset = ray.data.read_json(uri, lines=True)
            else:
                raise ConfigError(
                    f"cannot read '{uri}': unknown input format (use .jsonl, .parquet or .csv)"
                )
            return list(self.dataset.columns() or [])
        except ray.exceptions.RayError as e:
            raise LlambaError(f"cannot read '{uri}': {_first_line(e)}") from None
        except (OSError, ValueError) as e:
            raise LlambaError(f"cannot read '{uri}': {_first_line(e)}") from None

    def __iter__(self) -> Iterator[InputRow]:
        self.dataset.context.execution_options.preserve_order = True
        index = 0
        for batch in self.dataset.iter_batches(batch_format="pyarrow"):
            for data in batch.to_pylist():
                yield self._row(index, data)
                index += 1


def _is_uri(path: str) -> bool:
    return "://" in path  # file:// too: llamba's own reader takes plain paths only


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
