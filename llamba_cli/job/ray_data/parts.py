"""The output folder of a job run on Ray: one part file per block, resumable.

    out/generated.parquet/              the output path names a folder
        _llamba.manifest                fingerprint (JSON), format; rows and errors once finished
        part-000000.parquet             one finished block each: written to a hidden
        part-000001.parquet             temp name, fsynced, renamed

Only the driver writes here, one part per output block as it arrives, so a part that
exists is complete and holds ids no other part holds (ids are deduplicated before
any row runs).  Names starting with `_` or `.` are skipped by Arrow's and Ray's
dataset readers, so `pq.read_table(folder)` and `ray.data.read_parquet(folder)` read
the parts as one table.  When the job finishes, parts whose inferred column types
differ (a column all null in one block, say) are rewritten with the common schema,
so those readers agree on one.

Opening a folder decides what is already done, as `OutputStore` does for a file:
the ids of every part count as done unless their newest row is an error and
`retry_errors` is set.  Such a retried id is written again in a later part, and
`finish` drops its older rows.  A folder made for another job (a different
fingerprint) is refused unless `overwrite`.
"""

from __future__ import annotations

import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from llamba_cli.errors import OutputError, ResumeError
from llamba_cli.job.store import (
    _atomic_write,
    _changed_keys,
    _conform,
    _contains,
    _fsync_dir,
    _fsync_file,
    _hash_many,
    _hash_one,
    _jsonl_ids,
    _newest_per_id,
    _normalized,
    _parquet_ids,
    _unified_schema,
)

MANIFEST = "_llamba.manifest"
_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_RERUN_HINT = "rerun with --overwrite or choose another output path"


def output_format(path: str | Path) -> str:
    """`parquet` or `jsonl`, from the output path's extension; OutputError otherwise."""
    fmt = _FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise OutputError(f"cannot write '{path}': unknown output format (use .parquet or .jsonl)")
    return fmt


class PartFolder:
    """The output folder of one job: `is_done`, `write_part`, `finish`.

    Failures to read or write raise `OutputError` naming the folder.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        fingerprint: dict[str, Any],
        overwrite: bool = False,
        retry_errors: bool = False,
    ) -> None:
        self.path = Path(path)
        self.format = output_format(self.path)
        self.fingerprint = _normalized(fingerprint)
        self.retry_errors = retry_errors
        self._files: list[Path] = []  # the parts, in order, and per part ...
        self._hashes: list[np.ndarray] = []  # ... its id hashes ...
        self._errors: list[np.ndarray] = []  # ... and which rows are errors
        self._next = 0
        self._stored = _EMPTY
        self._done = _EMPTY
        try:
            self._open(overwrite)
        except OSError as e:
            raise OutputError(f"cannot open '{self.path}': {e.strerror or e}") from None
        self.done_count = len(self._done)

    # -- public API -----------------------------------------------------------------

    def is_done(self, row_id: str) -> bool:
        """Whether the id was stored (without error, with `retry_errors`) at open."""
        return _contains(self._done, _hash_one(row_id))

    def write_part(self, ids: list[str], errors: np.ndarray, payload: pa.Table | bytes) -> None:
        """Publish one block: a table (Parquet) or JSON lines (JSONL), atomically."""
        part = self.path / f"part-{self._next:06d}.{self.format}"
        tmp = self.path / f".{part.name}.tmp"
        try:
            if isinstance(payload, pa.Table):
                pq.write_table(payload, tmp)
                _fsync_file(tmp)
            else:
                with open(tmp, "wb") as stream:
                    stream.write(payload)
                    stream.flush()
                    os.fsync(stream.fileno())
            os.replace(tmp, part)
            _fsync_dir(self.path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise OutputError(f"cannot write '{part}': {e.strerror or e}") from None
        except pa.ArrowException as e:
            tmp.unlink(missing_ok=True)
            raise OutputError(f"cannot write '{part}': {e}") from None
        hashes = _hash_many(ids)
        if (
            self.retry_errors
            and not self._manifest.get("may_supersede")
            and any(_contains(self._stored, int(h)) for h in hashes)
        ):
            self._write_manifest(may_supersede=True)
        self._files.append(part)
        self._hashes.append(hashes)
        self._errors.append(np.asarray(errors, bool))
        self._next += 1

    def finish(self) -> tuple[int, int]:
        """Settle the folder once every row is written: drop superseded rows, give all
        Parquet parts one schema, record the totals.  Returns (rows, errors)."""
        try:
            if self._manifest.get("may_supersede"):
                self._drop_superseded()
            if self.format == "parquet":
                self._unify_schemas()
            hashes, errors = self._index()
            rows, n_errors = len(hashes), int(errors.sum())
            finished = datetime.now(timezone.utc).isoformat(timespec="seconds")
            self._write_manifest(finished=finished, rows=rows, errors=n_errors)
        except OSError as e:
            raise OutputError(f"cannot write '{self.path}': {e.strerror or e}") from None
        return rows, n_errors

    # -- opening --------------------------------------------------------------------

    def _open(self, overwrite: bool) -> None:
        if self.path.exists() and not self.path.is_dir():
            if not overwrite:
                raise ResumeError(
                    f"'{self.path}' is a file; a --ray run writes a folder of parts there;"
                    f" {_RERUN_HINT}"
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
                    f"'{self.path}' exists and was not produced by llamba; {_RERUN_HINT}"
                )
            self._manifest = {"fingerprint": self.fingerprint, "format": self.format}
            self._write_manifest()
            return
        self._manifest = manifest
        stored = manifest.get("fingerprint")
        if stored != self.fingerprint:
            changed = ", ".join(_changed_keys(stored, self.fingerprint))
            raise ResumeError(
                f"'{self.path}' was produced by a different job (changed: {changed}); {_RERUN_HINT}"
            )
        for stray in self.path.glob(".part-*.tmp"):
            stray.unlink()  # a part whose writer was killed
        parts = self._parts()
        for part in parts:
            chunks = _parquet_ids(part) if self.format == "parquet" else _jsonl_ids(part)
            ids: list[str] = []
            flags: list[np.ndarray] = []
            for chunk_ids, chunk_errors in chunks:
                ids.extend(chunk_ids)
                flags.append(chunk_errors)
            self._files.append(part)
            self._hashes.append(_hash_many(ids))
            self._errors.append(np.concatenate(flags) if flags else np.zeros(0, bool))
        self._next = _number(parts[-1]) + 1 if parts else 0
        if "finished" in manifest:
            self._write_manifest(finished=None)
        hashes, errors = self._index()
        if len(hashes):
            unique, first_in_reverse = np.unique(hashes[::-1], return_index=True)
            latest_error = errors[::-1][first_in_reverse]
            self._stored = unique
            self._done = unique[~latest_error] if self.retry_errors else unique

    # -- finishing ------------------------------------------------------------------

    def _drop_superseded(self) -> None:
        """Keep only the newest row of each id; rewrite (or remove) older parts."""
        keep = _newest_per_id(self._index()[0])
        position = 0
        kept_parts: list[int] = []
        for i, part in enumerate(self._files):
            n = len(self._hashes[i])
            mask = keep[position : position + n]
            position += n
            if mask.all():
                kept_parts.append(i)
                continue
            if not mask.any():
                part.unlink()
                _fsync_dir(self.path)
                continue
            if self.format == "parquet":
                table = pq.read_table(part).filter(pa.array(mask))
                self._replace(part, lambda tmp, t=table: pq.write_table(t, tmp))
            else:
                lines = [ln for ln in part.read_bytes().splitlines(keepends=True) if ln.strip()]
                kept = b"".join(line for line, k in zip(lines, mask, strict=True) if k)
                self._replace(part, lambda tmp, data=kept: tmp.write_bytes(data))
            self._hashes[i] = self._hashes[i][mask]
            self._errors[i] = self._errors[i][mask]
            kept_parts.append(i)
        self._files = [self._files[i] for i in kept_parts]
        self._hashes = [self._hashes[i] for i in kept_parts]
        self._errors = [self._errors[i] for i in kept_parts]
        self._write_manifest(may_supersede=None)

    def _unify_schemas(self) -> None:
        parts = self._files
        if not parts:
            return
        schemas = [pq.read_schema(part) for part in parts]
        target, as_text = _unified_schema(schemas)
        for part, schema in zip(parts, schemas, strict=True):
            if schema.remove_metadata() == target and not as_text:
                continue
            table = _conform(pq.read_table(part), target, as_text)
            self._replace(part, lambda tmp, t=table: pq.write_table(t, tmp))

    def _replace(self, part: Path, write: Any) -> None:
        tmp = self.path / f".{part.name}.tmp"
        try:
            write(tmp)
            _fsync_file(tmp)
            os.replace(tmp, part)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.path)

    # -- helpers --------------------------------------------------------------------

    def _parts(self) -> list[Path]:
        return sorted(self.path.glob(f"part-*.{self.format}"), key=_number)

    def _index(self) -> tuple[np.ndarray, np.ndarray]:
        if not self._hashes:
            return _EMPTY, np.zeros(0, bool)
        return np.concatenate(self._hashes), np.concatenate(self._errors)

    def _write_manifest(self, **changes: Any) -> None:
        self._manifest.update(changes)
        self._manifest = {k: v for k, v in self._manifest.items() if v is not None}
        _atomic_write(
            self.path / MANIFEST, orjson.dumps(self._manifest, option=orjson.OPT_INDENT_2)
        )


_EMPTY = np.zeros(0, np.uint64)


def _number(part: Path) -> int:
    return int(part.name.split(".", 1)[0].removeprefix("part-"))
