"""Where a job's output lives: its format, its folder, and the files kept beside it.

    out.parquet                     the finished output, only ever replaced whole
    .out.parquet.llamba.json        its sidecar: the job that wrote it (`job.manifest`)
    .out.parquet.llamba.lock        held by the run writing the output (`job.durable`)
    out.parquet.llamba-work/        unfinished work, on the output's filesystem
        manifest.json               the job it belongs to (`job.manifest`)
        part-000000.parquet         numbered parts, each complete once it has its name
        part-000001.parquet

`OutputLayout` only names these files and `check_location` only looks; the store
(`job.store`) creates, renames and removes them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from llamba_cli.errors import OutputError
from llamba_cli.job.durable import TMP_SUFFIX

OUTPUT_FORMATS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
}
_WORK_SUFFIX = ".llamba-work"
_PART = re.compile(r"part-(\d{6,})\.(parquet|jsonl)")


def output_format(path: Path) -> str:
    """ "parquet" or "jsonl", from the output path's extension; OutputError otherwise."""
    fmt = OUTPUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise OutputError(f"cannot write '{path}': unknown output format (use .parquet or .jsonl)")
    return fmt


def check_location(path: Path) -> None:
    """Fail before any work starts if the output path can never be written."""
    if path.is_dir():
        raise OutputError(f"cannot write '{path}': is a directory")
    if path.exists() and not path.is_file():
        raise OutputError(f"cannot write '{path}': not a regular file")
    parent = path.parent
    while not parent.exists():  # missing directories are created at open
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot write '{path}': '{parent}' is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write '{path}': permission denied in '{parent}'")


@dataclass(frozen=True)
class OutputLayout:
    """The names of an output's files.  `of(path)` raises OutputError for an output
    path whose extension names no format."""

    path: Path
    format: str
    work_dir: Path
    manifest: Path
    sidecar: Path
    lock: Path
    publish_tmp: Path  # the merged output before it is renamed onto `path`

    @classmethod
    def of(cls, path: str | Path) -> OutputLayout:
        out = Path(path)
        work_dir = out.with_name(out.name + _WORK_SUFFIX)
        return cls(
            path=out,
            format=output_format(out),
            work_dir=work_dir,
            manifest=work_dir / "manifest.json",
            sidecar=out.with_name(f".{out.name}.llamba.json"),
            lock=out.with_name(f".{out.name}.llamba.lock"),
            publish_tmp=out.with_name(f".{out.name}.llamba{TMP_SUFFIX}"),
        )

    def part(self, number: int) -> Path:
        """Part `number` in the work directory."""
        return self.work_dir / f"part-{number:06d}.{self.format}"

    def parts(self) -> list[Path]:
        """The parts of this output's format in the work directory, in order."""
        found = [
            entry
            for entry in self.work_dir.iterdir()
            if (match := _PART.fullmatch(entry.name)) and match.group(2) == self.format
        ]
        return sorted(found, key=part_number)


def part_number(part: Path) -> int:
    """The number in a part's name."""
    match = _PART.fullmatch(part.name)
    assert match is not None
    return int(match.group(1))
