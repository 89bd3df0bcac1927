"""The output folder of a job run on Ray: one part file per block, resumable.

    out/generated.parquet/              the output path names a folder
        _llamba.manifest                fingerprint (JSON), format; rows and errors once finished
        part-000000.parquet             one finished block each: written to a hidden
        part-000001.parquet             temp name, fsynced, renamed

Only the driver writes here, one part per output block as it arrives, so a part that
exists is complete and holds ids no other part holds (ids are deduplicated before
any row runs).  Names starting with `_` or `.` are skipped by Arrow's and Ray's
dataset readers, so `pq.read_table(folder)` and `ray.data.read_parquet(folder)` read
the parts as one table: every Parquet part has the job's output schema
(`Job.output_schema`), so those readers agree on one.

Opening a folder decides what is already done, as `OutputStore` does for a file:
the ids of every part count as done unless their newest row is an error and
`retry_errors` is set.  Such a retried id is written again in a later part, and
`finish` drops its older rows.  A folder made for another job (a different
fingerprint) is refused unless `overwrite`.  One run at a time: the folder is
locked as a local output is (`OutputLock`, `.<name>.llamba.lock` beside it).
"""

from __future__ import annotations

import functools
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from llamba_cli.errors import OutputError, ResumeError
from llamba_cli.job.durable import OutputLock, atomic_replace, atomic_write, fsync_dir
from llamba_cli.job.ids import StoredIds, contains, id_hash, id_hashes
from llamba_cli.job.layout import output_format as _output_format
from llamba_cli.job.manifest import RERUN_HINT, check_fingerprint

MANIFEST = "_llamba.manifest"
_JSON_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_INDENT_2


def output_format(path: str | Path) -> str:
    """`parquet` or `jsonl`, from the output path's extension; OutputError otherwise."""
    return _output_format(Path(path))


class PartFolder:
    """The output folder of one job: `is_done`, `write_part`, `finish`, `close`.

    Failures to read or write raise `OutputError` naming the folder.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        fingerprint: dict[str, Any],
        overwrite: bool = False,
        retry_errors: bool = False,
        id_field: str = "id",
    ) -> None:
        self.path = Path(path)
        self.format = output_format(self.path)
        self.fingerprint = fingerprint
        self.retry_errors = retry_errors
        self._files: list[Path] = []  # the parts, in order, ...
        self._rows: list[int] = []  # ... the rows of each
        self._ids = StoredIds(id_field)  # their rows' id hashes and error flags
        self._next = 0
        self._lock: OutputLock | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock = OutputLock(
                self.path.with_name(f".{self.path.name}.llamba.lock"), self.path
            )
            self._open(overwrite)
        except OSError as e:
            self.close()
            raise OutputError(f"cannot open '{self.path}': {e.strerror or e}") from None
        except BaseException:
            self.close()
            raise
        self.done_count = len(self._ids.done)

    # -- public API -----------------------------------------------------------------

    def is_done(self, row_id: str) -> bool:
        """Whether the id was stored (without error, with `retry_errors`) at open."""
        return contains(self._ids.done, id_hash(row_id))

    def write_part(self, ids: list[str], errors: np.ndarray, payload: pa.Table | bytes) -> None:
        """Publish one block: a table (Parquet) or JSON lines (JSONL), atomically."""
        part = self.path / f"part-{self._next:06d}.{self.format}"
        try:
            if isinstance(payload, pa.Table):
                atomic_replace(part, lambda tmp: pq.write_table(payload, tmp))
            else:
                atomic_write(part, payload)
        except OSError as e:
            raise OutputError(f"cannot write '{part}': {e.strerror or e}") from None
        except pa.ArrowException as e:
            raise OutputError(f"cannot write '{part}': {e}") from None
        hashes = id_hashes(ids)
        if (
            self.retry_errors
            and not self._manifest.get("may_supersede")
            and any(contains(self._ids.stored, int(h)) for h in hashes)
        ):
            self._write_manifest(may_supersede=True)
        self._files.append(part)
        self._rows.append(len(ids))
        self._ids.add(hashes, np.asarray(errors, bool))
        self._next += 1

    def finish(self) -> tuple[int, int]:
        """Settle the folder once every row is written: drop superseded rows and record
        the totals.  Returns (rows, errors)."""
        try:
            if self._manifest.get("may_supersede"):
                self._drop_superseded()
            hashes, errors = self._ids.all()
            rows, n_errors = len(hashes), int(errors.sum())
            finished = datetime.now(timezone.utc).isoformat(timespec="seconds")
            self._write_manifest(finished=finished, rows=rows, errors=n_errors)
        except OSError as e:
            raise OutputError(f"cannot write '{self.path}': {e.strerror or e}") from None
        return rows, n_errors

    def close(self) -> None:
        """Release the folder's lock (what was written stays)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # -- opening --------------------------------------------------------------------

    def _open(self, overwrite: bool) -> None:
        if self.path.exists() and not self.path.is_dir():
            if not overwrite:
                raise ResumeError(
                    f"'{self.path}' is a file; a --ray run writes a folder of parts there;"
                    f" {RERUN_HINT}"
                )
            self.path.unlink()
        manifest_path = self.path / MANIFEST
        if self.path.is_dir() and overwrite:
            if any(self.path.iterdir()) and not manifest_path.exists():
                raise ResumeError(
                    f"'{self.path}' exists and was not produced by llamba;"
                    " choose another output path"
                )
            shutil.rmtree(self.path)
        if not self.path.exists():
            self.path.mkdir(parents=True)
            self._manifest: dict[str, Any] = {
                "fingerprint": self.fingerprint,
                "format": self.format,
                "layout": "one part per block",
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            self._write_manifest()
            return
        try:
            manifest = orjson.loads(manifest_path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            manifest = None
        if not isinstance(manifest, dict):
            if any(self.path.iterdir()):
                raise ResumeError(
                    f"'{self.path}' exists and was not produced by llamba; {RERUN_HINT}"
                )
            self._manifest = {"fingerprint": self.fingerprint, "format": self.format}
            self._write_manifest()
            return
        self._manifest = manifest
        check_fingerprint(self.path, manifest.get("fingerprint"), self.fingerprint)
        for stray in self.path.glob(".part-*.tmp"):
            stray.unlink()  # a part whose writer was killed
        parts = self._parts()
        for part in parts:
            self._files.append(part)
            self._ids.add_file(part, self.format)  # OutputError on an unreadable part
            self._rows.append(_count_rows(part, self.format))
        self._next = _number(parts[-1]) + 1 if parts else 0
        if "finished" in manifest:
            self._write_manifest(finished=None)
        self._ids.freeze(self.retry_errors)

    # -- finishing ------------------------------------------------------------------

    def _drop_superseded(self) -> None:
        """Keep only the newest row of each id; rewrite (or remove) older parts."""
        keep = self._ids.newest_per_id()
        hashes, errors = self._ids.all()
        kept_ids = StoredIds(self._ids.id_field)
        kept_files: list[Path] = []
        kept_rows: list[int] = []
        position = 0
        for part, n in zip(self._files, self._rows, strict=True):
            mask = keep[position : position + n]
            rows = slice(position, position + n)
            position += n
            if not mask.any():
                part.unlink()
                fsync_dir(self.path)
                continue
            if not mask.all():
                if self.format == "parquet":
                    table = pq.read_table(part).filter(pa.array(mask))
                    atomic_replace(part, functools.partial(pq.write_table, table))
                else:
                    lines = [ln for ln in part.read_bytes().splitlines(keepends=True) if ln.strip()]
                    kept = b"".join(line for line, k in zip(lines, mask, strict=True) if k)
                    atomic_write(part, kept)
            kept_ids.add(hashes[rows][mask], errors[rows][mask])
            kept_files.append(part)
            kept_rows.append(int(mask.sum()))
        kept_ids.freeze(self.retry_errors)
        self._files, self._rows, self._ids = kept_files, kept_rows, kept_ids
        self._write_manifest(may_supersede=None)

    # -- helpers --------------------------------------------------------------------

    def _parts(self) -> list[Path]:
        return sorted(self.path.glob(f"part-*.{self.format}"), key=_number)

    def _write_manifest(self, **changes: Any) -> None:
        self._manifest.update(changes)
        self._manifest = {k: v for k, v in self._manifest.items() if v is not None}
        atomic_write(
            self.path / MANIFEST, orjson.dumps(self._manifest, default=str, option=_JSON_OPTIONS)
        )


def _number(part: Path) -> int:
    return int(part.name.split(".", 1)[0].removeprefix("part-"))


def _count_rows(part: Path, fmt: str) -> int:
    """The rows of one part: from its footer, or its non-blank lines."""
    if fmt == "parquet":
        with pq.ParquetFile(part) as parquet:
            return int(parquet.metadata.num_rows)
    with open(part, "rb") as stream:
        return sum(1 for line in stream if line.strip())
