"""The Python API for Ray users: llamba's engine as one stage of their own pipeline.

`map_dataset(ds, job)` returns `ds` mapped through an actor pool of engines, lazily,
like any Ray Data transform; the README's Ray section has a complete example.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llamba_cli.errors import ConfigError
from llamba_cli.job.execute import Job
from llamba_cli.job.ray_data.actor import BatchSource, EngineActor, pack_files
from llamba_cli.job.ray_data.runner import actor_model_spec, default_block_rows, import_ray
from llamba_cli.job.spec import JobSpec, build_spec

_NO_INPUT = "<ray dataset>"


def job_spec(settings: Mapping[str, Any]) -> JobSpec:
    """A `JobSpec` from job-file settings (`task`, `labels`, `template`, `[sampling]`
    and `[engine]` keys, ...) for a dataset rather than an input file."""
    return build_spec({"input": _NO_INPUT, **settings})


def map_dataset(
    ds: Any,
    job: JobSpec | Mapping[str, Any],
    *,
    actors: int = 1,
    threads_per_actor: int | None = None,
    batch_rows: int | None = None,
) -> Any:
    """`ds` mapped through llamba's engine: a `ray.data.Dataset` of result rows.

    `job` is a `JobSpec` or job-file settings (see `job_spec`); its input, output
    and run-control settings are not used.  The result has the columns of a local
    run's output (`id`, `text`, `finish_reason`, ... for generate; `id`, `label`,
    `confidence`, `p_<label>`, `logprob_<label>`, ... for classify; `json` with a
    schema; plus `keep_columns`), one row per input row (per sample with `n`), with
    a row that cannot run kept with its `error` set.

    `ds` needs an id column (`id`, or the job's `id_column`) of unique ids: ids are
    how results are matched to inputs (as in a local run, a row whose id repeats one
    earlier in its batch is dropped).  `actors` engines run at once, each with
    `threads_per_actor` CPUs (default 1; also its llama.cpp threads) and one `Engine`
    built when the actor starts; each call streams `batch_rows` rows (default 8 per
    slot) through it.  Parallelism also follows `ds`'s blocks: an actor takes whole
    blocks.  Actors hold their CPUs while the dataset runs, so leave CPUs free for
    upstream stages that run as tasks (or materialize them first).

    The job is checked here, in the calling process (which loads the model once to
    do so); a problem raises `LlambaError` before anything runs.  The model path
    must be readable on every node that runs an actor.
    """
    ray = import_ray()
    spec = job if isinstance(job, JobSpec) else job_spec(job)
    spec = actor_model_spec(spec)
    columns = list(ds.columns() or [])
    source = BatchSource(columns, spec.id_column)
    if source.id_column not in columns:
        raise ConfigError(
            f"the dataset needs an id column: 'id' or id_column (columns: {', '.join(columns)})"
        )
    checked = Job(spec, source=source)
    checked.model.close()
    if actors < 1:
        raise ConfigError(f"actors must be >= 1, got {actors}")
    if threads_per_actor is not None and threads_per_actor < 1:
        raise ConfigError(f"threads_per_actor must be >= 1, got {threads_per_actor}")
    threads = threads_per_actor or 1
    return ds.map_batches(
        EngineActor,
        fn_constructor_kwargs={
            "spec": spec,
            "columns": columns,
            "id_column": source.id_column,
            "output_format": "parquet",
            "schema": checked.output_schema(),
            "threads": threads,
            "fingerprint": checked.fingerprint,
            "files": pack_files(spec),
        },
        batch_size=batch_rows or default_block_rows(spec),
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=threads,
    )
