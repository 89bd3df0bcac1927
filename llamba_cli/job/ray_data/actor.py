"""The Ray actor that runs llamba's engine: one `Engine` per actor, built once.

Each call takes one batch of rows and streams it through the engine (continuous
batching over the batch, `--slots` sequences at a time), then returns the output
rows in the batch's order.  Rows become requests and finished requests become output
rows through the job layer's own code (`Job`, `_ResultWriter`), so the columns and
the per-row error handling are those of a local run.

A batch arrives in one of two shapes: rows the driver read with llamba's own reader
(`ROW_COLUMN`: each row pickled, ids and read errors already set), or a Ray user's
own columns, whose id comes from the id column.
"""

from __future__ import annotations

import dataclasses
import pickle
import re
import socket
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pyarrow as pa

from llamba_cli.engine import Engine
from llamba_cli.errors import ConfigError, LlambaError
from llamba_cli.job.execute import Job, JobSummary, NoProgress, _ResultWriter
from llamba_cli.job.readers import InputRow, InputSource, _resolve_id_column
from llamba_cli.job.spec import JobSpec
from llamba_cli.job.store import _column_array, _json_line

if TYPE_CHECKING:
    from llamba_cli.job.store import OutputStore

ROW_COLUMN = "__llamba_row"  # one pickled `InputRow` per row, made by the driver
JSONL_COLUMN = "__llamba_jsonl"  # one output line per row, when the output is JSONL
EVALUATED_COLUMN = "__llamba_prompt_evaluated"  # engine counters for the block ...
REUSED_COLUMN = "__llamba_prompt_reused"  # ... repeated on each row
INTERNAL_COLUMNS = (JSONL_COLUMN, EVALUATED_COLUMN, REUSED_COLUMN)

# An actor that cannot start raises this, and the driver turns it back into the
# LlambaError it was: Ray wraps a remote exception in several layers of its own.
_FAILURE = re.compile(r"\[llamba-error (\d+)\] (.*?) \[/llamba-error\]", re.DOTALL)


class ActorFailure(RuntimeError):
    def __init__(self, error: LlambaError) -> None:
        where = socket.gethostname()
        super().__init__(f"[llamba-error {error.exit_code}] {error} (on {where}) [/llamba-error]")


def reraise_actor_failure(exc: BaseException) -> None:
    """If `exc` (from Ray) carries an actor's `LlambaError`, raise it as one line."""
    match = _FAILURE.search(str(exc))
    if match is None:
        return
    error = LlambaError(match.group(2))
    error.exit_code = int(match.group(1))
    raise error from None


class BatchSource(InputSource):
    """The rows of the current batch, as the job layer's input source."""

    format = "parquet"  # not read from a file; the name only satisfies the base class

    def __init__(self, columns: Sequence[str], id_column: str | None) -> None:
        # The base class opens a file; a batch has its columns given instead.
        self.path = Path("<ray dataset>")
        self.batch_rows = 0
        self.columns = list(columns)
        self.id_column = _resolve_id_column(self.path, self.columns, id_column)
        self.rows: list[InputRow] = []

    def count_rows(self) -> int | None:
        return len(self.rows)

    def __iter__(self) -> Iterator[InputRow]:
        return iter(self.rows)

    def from_columns(self, batch: pa.Table) -> list[InputRow]:
        """A user's batch as rows; the id comes from the id column (`_row`'s rules)."""
        return [self._row(-1, data) for data in batch.to_pylist()]


class _Collected:
    """Stands in for the output store inside an actor: keeps the rows of one batch."""

    def __init__(self, output_format: str) -> None:
        self.format = output_format
        self.rows: list[dict[str, Any]] = []

    def is_done(self, row_id: str) -> bool:
        return False  # the driver skipped finished rows before they were sent

    def write(self, row: dict[str, Any]) -> None:
        self.rows.append(row)


class EngineActor:
    """A Ray Data callable class: `map_batches(EngineActor, fn_constructor_kwargs=...)`.

    `spec` is the job (its input and output are not used); `columns` and `id_column`
    describe the batches; `output_format` is "parquet" (typed Arrow columns, also for
    a returned dataset) or "jsonl" (each row also as its JSON line); `threads` the
    engine's CPU threads; `fingerprint`, when given, must match this actor's model,
    so a node with a different model file at the same path stops the job; `files`
    carries the job's small files (`pack_files`) to nodes that do not have them.
    """

    def __init__(
        self,
        spec: JobSpec,
        columns: Sequence[str],
        id_column: str | None,
        *,
        output_format: str = "parquet",
        threads: int | None = None,
        fingerprint: dict[str, Any] | None = None,
        files: dict[str, tuple[str, bytes]] | None = None,
        internal_columns: bool = False,
    ) -> None:
        self._failure: ActorFailure | None = None
        self._internal = internal_columns
        self._format = output_format
        try:
            threads = threads or spec.threads or _assigned_cpus()
            # Rows were selected (shard, limit, duplicates, done) before they got here.
            spec = dataclasses.replace(spec, threads=threads, shard=None, limit=None)
            spec = unpack_files(spec, files or {})
            self._source = BatchSource(columns, id_column)
            self.job = Job(spec, source=self._source)
            if fingerprint is not None and self.job.fingerprint["model"] != fingerprint["model"]:
                raise ConfigError(
                    f"the model file {self.job.model_path} differs from the driver's"
                    " (every node needs the same model file at the same path)"
                )
            self.engine = Engine(self.job.engine_config(), model=self.job.model)
        except LlambaError as e:
            # Raised on the first batch instead: a failed constructor makes Ray retry
            # the actor, and its error reaches the driver less directly.
            self._failure = ActorFailure(e)

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self._failure is not None:
            raise self._failure
        if ROW_COLUMN in batch.column_names:
            rows = [pickle.loads(blob) for blob in batch.column(ROW_COLUMN).to_pylist()]
        else:
            rows = self._source.from_columns(batch)
        self._source.rows = rows
        store = _Collected(self._format)
        summary = JobSummary(task=self.job.spec.task, output=None)
        # `_Collected` has the part of OutputStore that the writer uses.
        writer = _ResultWriter(self.job, cast("OutputStore", store), summary, NoProgress())
        before = (
            self.engine.stats.prompt_tokens_evaluated,
            self.engine.stats.prompt_tokens_reused,
        )
        for req in self.engine.run(writer.requests()):
            writer.finished(req)
        if self._format == "jsonl":
            # The rows travel as their JSON lines; the rest is the driver's bookkeeping.
            out = store.rows
            table = pa.table(
                {
                    "id": pa.array([row["id"] for row in out], pa.string()),
                    "error": pa.array([row["error"] for row in out], pa.string()),
                    "prompt_tokens": pa.array([row["prompt_tokens"] for row in out], pa.int64()),
                    "completion_tokens": pa.array(
                        [row.get("completion_tokens", 0) for row in out], pa.int64()
                    ),
                    JSONL_COLUMN: pa.array([_json_line(row) for row in out], pa.binary()),
                }
            )
        else:
            table = result_table(store.rows, self.job)
        if self._internal:
            n = table.num_rows
            evaluated = self.engine.stats.prompt_tokens_evaluated - before[0]
            reused = self.engine.stats.prompt_tokens_reused - before[1]
            table = table.append_column(EVALUATED_COLUMN, pa.array([evaluated] * n, pa.int64()))
            table = table.append_column(REUSED_COLUMN, pa.array([reused] * n, pa.int64()))
        return table

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


# Small files a job reads when it starts; the driver sends their bytes along, so only
# the model file has to be on every node.
_SHIPPED = ("json_schema", "grammar", "labels_file", "format")


def pack_files(spec: JobSpec) -> dict[str, tuple[str, bytes]]:
    """The job's small files, by setting: (file name, bytes).  Unreadable ones are
    left out: the driver's own check has already reported them."""
    files: dict[str, tuple[str, bytes]] = {}
    for key in _SHIPPED:
        value = getattr(spec, key)
        if not value or (key == "format" and not value.endswith(".toml") and "/" not in value):
            continue  # a packaged format is found by name
        path = Path(value).expanduser()
        try:
            files[key] = (path.name, path.read_bytes())
        except OSError:
            continue
    return files


def unpack_files(spec: JobSpec, files: dict[str, tuple[str, bytes]]) -> JobSpec:
    """`spec` pointing at local copies of `files` (written to a fresh temp folder)."""
    if not files:
        return spec
    folder = Path(tempfile.mkdtemp(prefix="llamba-job-"))
    changes: dict[str, str] = {}
    for key, (name, data) in files.items():
        target = folder / key / name
        target.parent.mkdir()
        target.write_bytes(data)
        changes[key] = str(target)
    return dataclasses.replace(spec, **changes)  # type: ignore[arg-type]


def result_table(rows: list[dict[str, Any]], job: Job) -> pa.Table:
    """Output rows as an Arrow table, with the job's own column types where known.

    Fixed types keep every block's schema the same (a block whose `error` is all
    null would otherwise get a null-typed column); kept input columns are inferred.
    """
    names = list(rows[0]) if rows else list(result_types(job))
    types = result_types(job)
    columns = []
    for name in names:
        values = [row.get(name) for row in rows]
        kind = types.get(name)
        columns.append(pa.array(values, kind) if kind is not None else _column_array(values))
    return pa.Table.from_arrays(columns, names=names)


def result_types(job: Job) -> dict[str, pa.DataType]:
    """The Arrow type of each result column the job layer writes."""
    spec = job.spec
    types: dict[str, pa.DataType] = {"id": pa.string()}
    if spec.n > 1:
        types["sample"] = pa.int64()
    if job.labels is None:
        types["text"] = pa.string()
        constraint = job.constraint
        if constraint is not None and constraint.is_json:
            types["json"] = constraint.json_type or pa.string()
        types.update(
            finish_reason=pa.string(), prompt_tokens=pa.int64(), completion_tokens=pa.int64()
        )
    else:
        types.update(label=pa.string(), confidence=pa.float64())
        types.update({f"p_{label}": pa.float64() for label in job.labels})
        types.update({f"logprob_{label}": pa.float64() for label in job.labels})
        types["prompt_tokens"] = pa.int64()
    types["error"] = pa.string()
    return types


def encode_rows(rows: list[InputRow]) -> pa.Table:
    """A block of rows read by the driver, for `EngineActor`."""
    return pa.table(
        {
            "id": pa.array([row.id for row in rows], pa.string()),
            ROW_COLUMN: pa.array([pickle.dumps(row) for row in rows], pa.binary()),
        }
    )


def errors_of(table: pa.Table) -> np.ndarray:
    return np.asarray(table.column("error").is_valid().to_numpy(zero_copy_only=False), bool)


def jsonl_payload(table: pa.Table) -> bytes:
    return b"".join(table.column(JSONL_COLUMN).to_pylist())


def _assigned_cpus() -> int:
    """The CPUs Ray reserved for this actor (its llama.cpp threads)."""
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return max(1, int(cpus))
