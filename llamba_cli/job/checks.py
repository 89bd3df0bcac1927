"""`validate` and `--dry-run`: look at a job's prompts without generating anything."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from llamba_cli.engine import Model
from llamba_cli.errors import RowError
from llamba_cli.job.execute import Job, JobOpener, check_outputs
from llamba_cli.job.manifest import preflight
from llamba_cli.job.models import ModelLoad
from llamba_cli.job.spec import JobSpec
from llamba_cli.job.summary import JobSummary


@dataclass
class ValidationReport:
    rows: int = 0
    bad_rows: list[tuple[str, str]] = field(default_factory=list)
    too_long: list[tuple[str, int]] = field(default_factory=list)
    max_tokens_seen: int = 0
    limit: int = 0
    duplicates: int = 0
    format: str = ""
    model: str = ""
    allocation: str = ""

    @property
    def exit_code(self) -> int:
        return 1 if (self.bad_rows or self.too_long or self.duplicates) else 0

    def lines(self) -> list[str]:
        out = [
            f"model: {self.model}",
            f"prompt format: {self.format}",
            f"engine: {self.allocation}",
            f"rows: {self.rows}; longest prompt {self.max_tokens_seen} tokens "
            f"(limit {self.limit - 1}, --ctx {self.limit})",
        ]
        if self.too_long:
            examples = ", ".join(f"{i!r} ({n} tokens)" for i, n in self.too_long[:5])
            out.append(f"too long: {len(self.too_long)} rows, e.g. {examples}")
        if self.bad_rows:
            examples = "; ".join(f"{i!r}: {e}" for i, e in self.bad_rows[:5])
            out.append(f"rows that would end in error: {len(self.bad_rows)}, e.g. {examples}")
        if self.duplicates:
            out.append(f"duplicate ids: {self.duplicates}")
        out.append("ok" if self.exit_code == 0 else "problems found")
        return out


def validate_job(
    spec: JobSpec, *, opener: JobOpener = Job, model: Model | ModelLoad | None = None
) -> ValidationReport:
    """Open everything a run would (input, columns, labels, model, output) and tokenize
    every prompt (or `--limit` of them) against the per-sequence context.  What a run
    would refuse before starting raises the same error here.  `model`: a model, or a
    load the caller started (see `run_job`)."""
    if spec.output:
        check_outputs(spec)
    job = opener(spec, model=model)
    if spec.output:
        out = Path(spec.output).expanduser()
        preflight(out, fingerprint=job.fingerprint, overwrite=spec.overwrite)
    report = ValidationReport(
        limit=spec.ctx,
        format=job.format.name,
        model=job.model_path.name,
        allocation=job.allocation(),
    )
    summary = JobSummary(task=spec.task, output=None)
    for row in job.rows(None, summary):
        report.rows += 1
        try:
            n = len(job.model.tokenize(job.prompt(row)))
        except RowError as e:
            report.bad_rows.append((row.id, str(e)))
            continue
        report.max_tokens_seen = max(report.max_tokens_seen, n)
        if n >= spec.ctx:
            report.too_long.append((row.id, n))
    report.duplicates = summary.duplicates
    return report


def dry_run(
    spec: JobSpec,
    default_rows: int = 5,
    *,
    opener: JobOpener = Job,
    notes: list[str] | None = None,
    model: Model | ModelLoad | None = None,
) -> Iterator[tuple[str, int, str]]:
    """(id, prompt tokens, prompt text) of the first rows (`--limit`, default 5).
    `notes`, when given, gets what a run of the whole job would allocate.  `model`: a
    model, or a load the caller started."""
    job = opener(spec, model=model)
    if notes is not None:
        notes.append(f"engine: {job.allocation()}")
    summary = JobSummary(task=spec.task, output=None)
    shown = spec.limit if spec.limit is not None else default_rows
    for row in itertools.islice(job.rows(None, summary), shown):
        try:
            prompt = job.prompt(row)
        except RowError as e:
            yield row.id, 0, f"error: {e}"
            continue
        yield row.id, len(job.model.tokenize(prompt)), prompt
