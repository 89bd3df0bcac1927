"""`--ray` and its options on every job command, and the dispatch to the Ray runner.

The options join the shared option table of `llamba_cli.cli.app`; `take` pulls them
out of a command's arguments before the rest become a `JobSpec`, and `runner` picks
the local runner or the Ray one.  Ray itself is imported only when `--ray` runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import typer

from llamba_cli.errors import ConfigError
from llamba_cli.job.execute import JobSummary, ProgressSink, run_job
from llamba_cli.job.spec import JobSpec

_PANEL = "Ray"

# name -> (annotation, option), as in app.OPTIONS.
OPTIONS: dict[str, tuple[Any, Any]] = {
    "ray": (
        bool,
        typer.Option(
            "--ray",
            help="Run on a Ray cluster (pip install 'llamba[ray]'); the output is a folder "
            "of parts.",
            rich_help_panel=_PANEL,
        ),
    ),
    "address": (
        str | None,
        typer.Option(
            "--address",
            help="Ray cluster: auto, ray://host:10001, or host:port (default: $RAY_ADDRESS, "
            "else a new local instance).",
            rich_help_panel=_PANEL,
        ),
    ),
    "actors": (
        int | None,
        typer.Option(
            "--actors",
            help="Engines running at once, one per actor (default: the cluster's CPUs / "
            "threads per actor).",
            rich_help_panel=_PANEL,
        ),
    ),
    "threads_per_actor": (
        int | None,
        typer.Option(
            "--threads-per-actor",
            help="CPUs each actor reserves and runs llama.cpp on (default: --threads, else "
            "the CPUs / --actors, else up to 8).",
            rich_help_panel=_PANEL,
        ),
    ),
    "block_rows": (
        int | None,
        typer.Option(
            "--block-rows",
            help="Rows per block: one actor call and one output part (default 8 x --slots).",
            rich_help_panel=_PANEL,
        ),
    ),
}

Runner = Callable[[JobSpec, ProgressSink], JobSummary]


def take(kwargs: dict[str, Any]) -> Any:
    """Remove the Ray options from a command's arguments: `RayOptions` with --ray,
    else None (and ConfigError if a Ray-only option was given without it)."""
    values = {key: kwargs.pop(key, None) for key in OPTIONS}
    if not values.pop("ray"):
        given = [key for key, value in values.items() if value is not None]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise ConfigError(f"{flag} applies only with --ray")
        return None
    from llamba_cli.job.ray_data.runner import RayOptions

    return RayOptions(**values)


def runner(options: Any) -> Runner:
    """The function that runs a job: on Ray with `options`, else locally."""
    if options is None:
        return run_job
    from llamba_cli.job.ray_data.runner import run_ray_job

    def run(spec: JobSpec, progress: ProgressSink) -> JobSummary:
        return run_ray_job(spec, options, progress)

    return run
