"""The Ray actor that runs llamba's engine: one `Engine` per actor, built once.

Each call takes one batch of rows and streams it through the engine (continuous
batching over the batch, `--slots` sequences at a time), then returns the output
rows in the batch's order.  Rows become requests and finished requests become output
rows through the job layer's own code (`Job` and its `writer`), so the columns, their
types (`Job.output_schema`) and the per-row error handling are those of a local run.

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
from llamba_cli.job.columns import rows_to_table
from llamba_cli.job.execute import Job
from llamba_cli.job.jsonl import json_line
from llamba_cli.job.readers import InputRow, InputSource
from llamba_cli.job.spec import JobSpec
from llamba_cli.job.summary import JobSummary, NoProgress

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
        self._given = list(columns)
        super().__init__(Path("<ray dataset>"), id_column=id_column, batch_rows=0)
        self.rows: list[InputRow] = []

    def _read_columns(self) -> list[str]:
        return self._given  # a batch has its columns given, not read from a file

    def count_rows(self) -> int | None:
        # Unknown: the actor's one engine serves every batch it will be given, so it
        # must not be sized by the first (or, at construction, by none: one slot).
        return None

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
    a returned dataset) or "jsonl" (each row also as its JSON line); `schema` the
    output's schema when the driver knows it better (the types of kept columns of a
    Parquet input), else the job's own; `threads` the
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
        schema: pa.Schema | None = None,
        threads: int | None = None,
        fingerprint: dict[str, Any] | None = None,
        files: dict[str, tuple[str, bytes]] | None = None,
        internal_columns: bool = False,
    ) -> None:
        self._failure: ActorFailure | None = None
        self._internal = internal_columns
        self._format = output_format
        try:
            threads = threads or _assigned_cpus()
            # Rows were selected (shard, limit, duplicates, done) before they got here.
            engine = dataclasses.replace(spec.engine, n_threads=threads)
            spec = dataclasses.replace(spec, engine=engine, shard=None, limit=None)
            spec = unpack_files(spec, files or {})
            self._source = BatchSource(columns, id_column)
            self.job = Job(spec, source=self._source)
            self._schema = schema if schema is not None else self.job.output_schema()
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
        writer = self.job.writer(cast("OutputStore", store), summary, NoProgress())
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
                    JSONL_COLUMN: pa.array([json_line(row) for row in out], pa.binary()),
                }
            )
        else:
            table = rows_to_table(store.rows, self._schema)
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
