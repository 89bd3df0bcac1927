"""What a run reports: progress while it goes (`ProgressSink`) and a `JobSummary` at
the end, also written as JSON by `write_metrics`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson

from llamba_cli.errors import OutputError
from llamba_cli.job.durable import atomic_write


class ProgressSink(Protocol):
    def start(self, total: int | None, unit: str) -> None: ...
    def advance(self, rows: int, errors: int, tokens: int) -> None: ...
    def note(self, text: str) -> None: ...


class NoProgress:
    def start(self, total: int | None, unit: str) -> None:
        pass

    def advance(self, rows: int, errors: int, tokens: int) -> None:
        pass

    def note(self, text: str) -> None:
        pass


@dataclass
class JobSummary:
    """What a run did; `exit_code` follows the documented contract (0 / 1)."""

    task: str
    output: str | None
    rows_written: int = 0
    errors: int = 0
    skipped_done: int = 0
    duplicates: int = 0
    duplicate_examples: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    prompt_tokens_evaluated: int = 0
    prompt_tokens_reused: int = 0
    generated_tokens: int = 0
    wall_seconds: float = 0.0
    aborted: str | None = None
    errors_fail: bool = False  # errors make the exit code 1 (no --max-errors given)
    fingerprint: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def rows_per_second(self) -> float:
        return self.rows_written / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        return 1 if (self.errors_fail or self.duplicates or self.aborted) else 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "output": self.output,
            "rows_written": self.rows_written,
            "errors": self.errors,
            "skipped_already_done": self.skipped_done,
            "duplicate_ids": self.duplicates,
            "prompt_tokens": self.prompt_tokens,
            "prompt_tokens_evaluated": self.prompt_tokens_evaluated,
            "prompt_tokens_reused": self.prompt_tokens_reused,
            "generated_tokens": self.generated_tokens,
            "tokens_per_second": round(self.tokens_per_second, 2),
            "rows_per_second": round(self.rows_per_second, 3),
            "wall_seconds": round(self.wall_seconds, 3),
            "aborted": self.aborted,
            "exit_code": self.exit_code,
            "fingerprint": self.fingerprint,
        }


def write_metrics(path: str, summary: JobSummary) -> None:
    p = Path(path).expanduser()
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(p, orjson.dumps(summary.as_dict(), option=orjson.OPT_INDENT_2))
    except OSError as e:
        raise OutputError(f"cannot write metrics to {p}: {e.strerror or e}") from None
