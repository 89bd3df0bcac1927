"""Crash-safe, resumable, incrementally written output of a job.

Nothing half-written ever sits at the output path.  Rows are buffered, then
published as numbered parts in a work directory beside the output (`job.layout`),
each written to a temp name, fsynced and renamed.  A kill at any moment loses at
most the rows not yet flushed; every part that exists is complete, and leftover
temp files are removed when the store is opened again.  `finalize` merges the parts
into a temp file beside the output, fsyncs it, renames it onto the output path and
removes the work directory.  Work and finished outputs carry the job's fingerprint
(`job.manifest`), so a rerun can tell whether they are its own.

Opening a store decides what is already done:

- a work directory with the same fingerprint: resume; its rows count as done;
- a finished output with the same fingerprint: all its rows count as done, and it
  stays untouched unless new rows are written, in which case it is first moved into
  a new work directory as part 0 and merged again by `finalize`;
- a different fingerprint, or an output llamba did not write: `ResumeError`;
- `overwrite=True`: nothing counts as done, and nothing is deleted at open.  The old
  output, sidecar and work directory are removed when the first new part is
  published (or at `finalize` if no rows are written), so a job that fails before
  producing anything leaves them as they were.

With `retry_errors`, rows stored with an error do not count as done; writing such an
id again supersedes the old row, and the final merge keeps only the newest row per
id.  The manifest records whether superseding rows may exist, so jobs that never
rewrite an id never pay for that dedupe.  Ids are kept in memory as 64-bit hashes
(`job.ids.StoredIds`, about 9 bytes a row), not as strings.

One run at a time: the store holds an exclusive lock on the output (`OutputLock`,
`.<name>.llamba.lock` beside it) from open to `finalize` or `close`; a second run on
the same output fails at open with `OutputError` naming the holder's pid.  Part
publishing and the final merge run with signals deferred (`interrupt.deferred`), so
a SIGTERM never leaves a part renamed into place but not counted.  With a `schema`,
every Parquet part and the merged file have exactly that schema (`job.columns`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from llamba_cli.errors import OutputError
from llamba_cli.job.durable import (
    TMP_SUFFIX,
    OutputLock,
    atomic_replace,
    atomic_write,
    fsync_dir,
    fsync_file,
    tmp_name,
)
from llamba_cli.job.ids import StoredIds, contains, id_hash
from llamba_cli.job.interrupt import deferred
from llamba_cli.job.jsonl import json_line, merge_jsonl_parts
from llamba_cli.job.layout import OutputLayout, check_location, part_number
from llamba_cli.job.manifest import (
    RERUN_HINT,
    check_fingerprint,
    finished_fingerprint,
    new_manifest,
    normalized,
    parquet_metadata,
    read_manifest,
    write_manifest,
    write_sidecar,
)

if TYPE_CHECKING:
    import pyarrow as pa


class OutputStore:
    """The output of one job: buffered writes, durable parts, atomic final publish.

    `is_done(id)` and `done_count` describe the rows stored when the store was opened.
    `write` buffers a row (a dict with at least `id_field` and `error`) and flushes once
    `flush_rows` rows are buffered or the oldest buffered row is `flush_seconds` old
    (checked on each write; there is no background timer).  `flush` makes every
    written row durable; `close` flushes and leaves the work resumable; `finalize`
    publishes the output.  Failures to write raise `OutputError` naming the path;
    parts already published stay.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        fingerprint: Mapping[str, Any],
        overwrite: bool = False,
        retry_errors: bool = False,
        flush_rows: int = 256,
        flush_seconds: float = 10.0,
        schema: pa.Schema | None = None,
        id_field: str = "id",
    ) -> None:
        self.layout = OutputLayout.of(path)
        self.path = self.layout.path
        self.format: str = self.layout.format
        self.work_dir = self.layout.work_dir
        self.id_field = id_field
        self.schema = schema if self.format == "parquet" else None
        self.fingerprint: dict[str, Any] = normalized(fingerprint)
        self.retry_errors = retry_errors
        self.flush_rows = max(1, flush_rows)
        self.flush_seconds = flush_seconds

        self._overwrite = overwrite
        self._work_ready = False  # the work dir exists and belongs to this job
        self._finished_output = False  # the output path holds this job's finished file
        self._manifest: dict[str, Any] = {}
        self._supersedes = False
        self._next_part = 0
        self._ids = StoredIds(id_field)
        self._buffer: list[dict[str, Any]] = []
        self._buffer_since: float | None = None
        self._finalized = False
        self._created_dirs: list[Path] = []
        self._written = 0

        check_location(self.path)
        with self._os_errors("open"):
            self._make_parent()
            self._lock = OutputLock(self.layout.lock, self.path)
        try:
            with self._os_errors("open"):
                self._open()
        except BaseException:
            self._release()
            raise
        self.done_count: int = len(self._ids.done)

    # -- public API -----------------------------------------------------------------

    def is_done(self, row_id: str) -> bool:
        """Whether the id was stored when the store was opened (without error, with
        `retry_errors`).  Rows written since opening are not looked up."""
        return contains(self._ids.done, id_hash(row_id))

    def write(self, row: dict[str, Any]) -> None:
        """Buffer one row; flushes when the buffer is full or old enough."""
        if self._finalized:
            raise RuntimeError("write() after finalize()")
        if (
            self.retry_errors
            and not self._supersedes
            and contains(self._ids.stored, id_hash(str(row[self.id_field])))
        ):
            self._supersedes = True
        self._buffer.append(row)
        now = time.monotonic()
        if self._buffer_since is None:
            self._buffer_since = now
        if len(self._buffer) >= self.flush_rows or now - self._buffer_since >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Publish the buffered rows as one new part (fsynced file, atomic rename)."""
        if not self._buffer:
            return
        with deferred(), self._os_errors("write"):
            self._publish_part(self._buffer)
            self._written += len(self._buffer)
            self._buffer = []
            self._buffer_since = None

    @property
    def rows_kept(self) -> int:
        """Rows made durable by this run so far."""
        return self._written

    def close(self) -> None:
        """Flush and stop; the work directory stays, so the job can be resumed."""
        try:
            if not self._finalized:
                self.flush()
        finally:
            self._release()

    def finalize(self) -> Path:
        """Flush, merge all parts into the output path atomically, remove the work dir.

        A finished output to which nothing was added is left untouched.
        """
        if self._finalized:
            return self.path
        self.flush()
        if self._finished_output and not self._work_ready:
            self._finalized = True
            self._release()
            return self.path
        with deferred(), self._os_errors("write"):
            self._ensure_work_dir()
            self._merge_and_publish()
        self._finalized = True
        self._release()
        return self.path

    def __enter__(self) -> OutputStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- opening --------------------------------------------------------------------

    def _make_parent(self) -> None:
        """Create the missing folders of the output path (removed again by `_release`
        if nothing was written into them)."""
        missing: list[Path] = []
        parent = self.path.parent
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        for folder in reversed(missing):
            folder.mkdir()
            self._created_dirs.append(folder)

    def _release(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.release()
        for folder in reversed(self._created_dirs):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty
        self._created_dirs = []

    def _open(self) -> None:
        for leftover in (self.layout.publish_tmp, tmp_name(self.layout.sidecar)):
            leftover.unlink(missing_ok=True)
        if self._overwrite:
            return  # nothing is read, and nothing deleted until new rows are published
        work_exists = self.work_dir.is_dir()
        manifest = read_manifest(self.layout.manifest) if work_exists else None
        if work_exists and manifest is None:
            if self.layout.parts():
                raise OutputError(
                    f"cannot resume '{self.path}': '{self.layout.manifest}' is missing"
                    f" or unreadable; {RERUN_HINT}"
                )
            shutil.rmtree(self.work_dir)  # killed while creating it: nothing to keep
            work_exists = False
        if manifest is not None:
            check_fingerprint(self.path, manifest.get("fingerprint"), self.fingerprint)
            if self.path.exists():
                work_exists = self._reconcile(manifest)
        if work_exists and manifest is not None:
            self._resume(manifest)
        elif self.path.exists():
            check_fingerprint(self.path, finished_fingerprint(self.layout), self.fingerprint)
            self._finished_output = True
            self._ids.add_file(self.path, self.format)
        self._ids.freeze(self.retry_errors)

    def _reconcile(self, manifest: dict[str, Any]) -> bool:
        """Both the output and the work dir exist: settle which one holds the job.

        Returns whether the work dir is still in use.
        """
        part0 = self.layout.part(0)
        if manifest.get("publishing"):
            # finalize published the output but was killed before removing the work dir
            shutil.rmtree(self.work_dir)
            fsync_dir(self.path.parent)
            return False
        if manifest.get("adopting") and not part0.exists():
            # killed while moving the finished output into the work dir: finish the move
            os.replace(self.path, part0)
            fsync_dir(self.work_dir)
            fsync_dir(self.path.parent)
            return True
        raise OutputError(
            f"cannot resume '{self.path}': it exists next to unfinished work in"
            f" '{self.work_dir}'; remove one of them or rerun with --overwrite"
        )

    def _resume(self, manifest: dict[str, Any]) -> None:
        for stray in self.work_dir.iterdir():
            if stray.name.endswith(TMP_SUFFIX):
                stray.unlink()  # a part or manifest whose writer was killed
        self._manifest = manifest
        self._supersedes = bool(manifest.get("may_supersede"))
        if manifest.get("publishing") or manifest.get("adopting"):
            self._write_manifest(publishing=False, adopting=False)
        parts = self.layout.parts()
        for part in parts:
            self._ids.add_file(part, self.format)
        self._next_part = part_number(parts[-1]) + 1 if parts else 0
        self._work_ready = True

    # -- writing --------------------------------------------------------------------

    def _ensure_work_dir(self) -> None:
        """Make the work dir ready for new parts, claiming or adopting what is there."""
        if self._work_ready:
            return
        if self._overwrite:
            self.path.unlink(missing_ok=True)
            self.layout.sidecar.unlink(missing_ok=True)
            if self.work_dir.exists():
                shutil.rmtree(self.work_dir)
        self.work_dir.parent.mkdir(parents=True, exist_ok=True)
        self.work_dir.mkdir()
        self._manifest = new_manifest(self.fingerprint, self.format, may_supersede=self._supersedes)
        if self._finished_output:
            # The finished file becomes part 0; the manifest says so first, so a kill
            # between the two steps is completed on the next open.
            self._write_manifest(adopting=True)
            os.replace(self.path, self.layout.part(0))
            fsync_dir(self.work_dir)
            self.layout.sidecar.unlink(missing_ok=True)
            self._write_manifest(adopting=False)
            self._next_part = 1
            self._finished_output = False
        else:
            self._write_manifest()
        fsync_dir(self.path.parent)
        self._work_ready = True

    def _publish_part(self, rows: list[dict[str, Any]]) -> None:
        self._ensure_work_dir()
        if self._supersedes and not self._manifest.get("may_supersede"):
            self._write_manifest(may_supersede=True)  # before any superseding row lands
        part = self.layout.part(self._next_part)
        if self.format == "parquet":
            import pyarrow.parquet as pq

            from llamba_cli.job.columns import rows_to_table

            table = rows_to_table(rows, self.schema)
            atomic_replace(part, lambda tmp: pq.write_table(table, tmp))
        else:
            atomic_write(part, b"".join(json_line(row) for row in rows))
        self._next_part += 1
        self._ids.add_rows(
            (str(row[self.id_field]) for row in rows),
            (row.get("error") is not None for row in rows),
        )

    def _merge_and_publish(self) -> None:
        parts = self.layout.parts()
        _, errors = self._ids.all()
        keep = self._ids.newest_per_id() if self._supersedes else None
        kept_errors = errors if keep is None else errors[keep]
        self._write_manifest(publishing=True)
        tmp = self.layout.publish_tmp
        try:
            if self.format == "parquet":
                from llamba_cli.job.columns import merge_parquet_parts

                metadata = parquet_metadata(self.fingerprint)
                merge_parquet_parts(parts, tmp, metadata=metadata, keep=keep, schema=self.schema)
                fsync_file(tmp)
            else:
                merge_jsonl_parts(parts, tmp, keep)
            write_sidecar(
                self.layout.sidecar,
                self.fingerprint,
                self.format,
                rows=len(kept_errors),
                errors=int(kept_errors.sum()),
            )
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(self.path.parent)
        shutil.rmtree(self.work_dir)
        fsync_dir(self.path.parent)
        self._work_ready = False

    def _write_manifest(self, **changes: Any) -> None:
        self._manifest.update(changes)
        write_manifest(self.layout.manifest, self._manifest)

    # -- helpers --------------------------------------------------------------------

    @contextlib.contextmanager
    def _os_errors(self, verb: str) -> Iterator[None]:
        """Turn filesystem and Arrow failures into one-line `OutputError`s."""
        try:
            yield
        except OSError as exc:
            reason = exc.strerror or _first_line(exc)
            if exc.filename and Path(exc.filename) != self.path:
                reason = f"{reason} ('{exc.filename}')"
            raise OutputError(f"cannot {verb} '{self.path}': {reason}") from None
        except Exception as exc:
            if not isinstance(exc, orjson.JSONEncodeError) and not _is_arrow_error(exc):
                raise
            raise OutputError(f"cannot {verb} '{self.path}': {_first_line(exc)}") from None


def _is_arrow_error(exc: Exception) -> bool:
    """Whether `exc` is Arrow's.  Without Arrow loaded (a JSON Lines job never loads
    it) nothing can have raised one."""
    pa = sys.modules.get("pyarrow")
    return pa is not None and isinstance(exc, pa.ArrowException)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
