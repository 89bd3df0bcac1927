"""Crash-safe, resumable, incrementally written output of a job.

Nothing half-written ever sits at the output path.  Rows are buffered, then
published in numbered part files inside a work directory beside the output,
`<out>.llamba-work/` (same filesystem, so renames are atomic):

    out.parquet.llamba-work/
        manifest.json          fingerprint, format, created; flags described below
        part-000000.parquet    each part: written to a temp name, fsynced, renamed
        part-000001.parquet

A kill at any moment loses at most the rows not yet flushed; every part that exists
is complete, and leftover temp files are removed when the store is opened again.
`finalize` merges the parts into a temp file beside the output, fsyncs it, and
`os.replace`s it onto the output path, then removes the work directory.  A finished
output carries its job's fingerprint (Parquet schema metadata under
`FINGERPRINT_KEY`, and for both formats a sidecar `.<name>.llamba.json`), so a rerun
can tell whether the file is its own.

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
rewrite an id never pay for that dedupe.  Ids are kept in memory as 64-bit hashes in
sorted numpy arrays (about 9 bytes a row), not as strings.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from hashlib import blake2b
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from llamba_cli.errors import OutputError, ResumeError

FINGERPRINT_KEY = b"llamba.fingerprint"

_OUTPUT_FORMATS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
}
_WORK_SUFFIX = ".llamba-work"
_MANIFEST = "manifest.json"
_TMP = ".tmp"
_PART = re.compile(r"part-(\d{6,})\.(parquet|jsonl)")
_ID_BATCH = 65_536
_MERGE_BATCH = 65_536
_ROW_GROUP_ROWS = 131_072  # merged output is regrouped: parts are small, readers like big groups
_JSON_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY
_RERUN_HINT = "rerun with --overwrite or choose another output path"


class OutputStore:
    """The output of one job: buffered writes, durable parts, atomic final publish.

    `is_done(id)` and `done_count` describe the rows stored when the store was opened.
    `write` buffers a row (a dict with at least `id` and `error`) and flushes once
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
    ) -> None:
        self.path = Path(path)
        fmt = _OUTPUT_FORMATS.get(self.path.suffix.lower())
        if fmt is None:
            raise OutputError(
                f"cannot write '{self.path}': unknown output format (use .parquet or .jsonl)"
            )
        self.format: str = fmt
        self.fingerprint: dict[str, Any] = _normalized(fingerprint)
        self.retry_errors = retry_errors
        self.flush_rows = max(1, flush_rows)
        self.flush_seconds = flush_seconds
        self.work_dir = self.path.with_name(self.path.name + _WORK_SUFFIX)
        self.sidecar_path = self.path.with_name(f".{self.path.name}.llamba.json")
        self._publish_tmp = self.path.with_name(f".{self.path.name}.llamba{_TMP}")

        self._overwrite = overwrite
        self._work_ready = False  # the work dir exists and belongs to this job
        self._finished_output = False  # the output path holds this job's finished file
        self._manifest: dict[str, Any] = {}
        self._supersedes = False
        self._next_part = 0
        self._hashes: list[np.ndarray] = []  # per part, in order: id hashes ...
        self._errors: list[np.ndarray] = []  # ... and whether the row has an error
        self._stored = _EMPTY  # sorted unique hashes of every stored id
        self._done = _EMPTY  # sorted unique hashes of the ids that count as done
        self._buffer: list[dict[str, Any]] = []
        self._buffer_since: float | None = None
        self._finalized = False

        self._check_location()
        with self._os_errors("open"):
            self._open()
        self.done_count: int = len(self._done)

    # -- public API -----------------------------------------------------------------

    def is_done(self, row_id: str) -> bool:
        """Whether the id was stored when the store was opened (without error, with
        `retry_errors`).  Rows written since opening are not looked up."""
        return _contains(self._done, _hash_one(row_id))

    def write(self, row: dict[str, Any]) -> None:
        """Buffer one row; flushes when the buffer is full or old enough."""
        if self._finalized:
            raise RuntimeError("write() after finalize()")
        if (
            self.retry_errors
            and not self._supersedes
            and _contains(self._stored, _hash_one(str(row["id"])))
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
        with self._os_errors("write"):
            self._publish_part(self._buffer)
        self._buffer = []
        self._buffer_since = None

    def close(self) -> None:
        """Flush and stop; the work directory stays, so the job can be resumed."""
        if not self._finalized:
            self.flush()

    def finalize(self) -> Path:
        """Flush, merge all parts into the output path atomically, remove the work dir.

        A finished output to which nothing was added is left untouched.
        """
        if self._finalized:
            return self.path
        self.flush()
        if self._finished_output and not self._work_ready:
            self._finalized = True
            return self.path
        with self._os_errors("write"):
            self._ensure_work_dir()
            self._merge_and_publish()
        self._finalized = True
        return self.path

    def __enter__(self) -> OutputStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- opening --------------------------------------------------------------------

    def _check_location(self) -> None:
        """Fail before any work starts if the output path can never be written."""
        if self.path.is_dir():
            raise OutputError(f"cannot write '{self.path}': is a directory")
        parent = self.path.parent
        while not parent.exists():  # missing directories are created on the first flush
            parent = parent.parent
        if not parent.is_dir():
            raise OutputError(f"cannot write '{self.path}': '{parent}' is not a directory")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputError(f"cannot write '{self.path}': permission denied in '{parent}'")

    def _open(self) -> None:
        for leftover in (self._publish_tmp, _tmp_name(self.sidecar_path)):
            leftover.unlink(missing_ok=True)
        if self._overwrite:
            return  # nothing is read, and nothing deleted until new rows are published
        work_exists = self.work_dir.is_dir()
        manifest = self._read_manifest() if work_exists else None
        if work_exists and manifest is None:
            if self._part_paths():
                raise OutputError(
                    f"cannot resume '{self.path}': '{self.work_dir / _MANIFEST}' is missing"
                    f" or unreadable; {_RERUN_HINT}"
                )
            shutil.rmtree(self.work_dir)  # killed while creating it: nothing to keep
            work_exists = False
        if manifest is not None:
            self._check_fingerprint(manifest.get("fingerprint"))
            if self.path.exists():
                work_exists = self._reconcile(manifest)
        if work_exists and manifest is not None:
            self._resume(manifest)
        elif self.path.exists():
            self._check_fingerprint(self._finished_fingerprint())
            self._finished_output = True
            self._load_ids(self.path)
        self._compute_done()

    def _reconcile(self, manifest: dict[str, Any]) -> bool:
        """Both the output and the work dir exist: settle which one holds the job.

        Returns whether the work dir is still in use.
        """
        part0 = self._part_path(0)
        if manifest.get("publishing"):
            # finalize published the output but was killed before removing the work dir
            shutil.rmtree(self.work_dir)
            _fsync_dir(self.path.parent)
            return False
        if manifest.get("adopting") and not part0.exists():
            # killed while moving the finished output into the work dir: finish the move
            os.replace(self.path, part0)
            _fsync_dir(self.work_dir)
            _fsync_dir(self.path.parent)
            return True
        raise OutputError(
            f"cannot resume '{self.path}': it exists next to unfinished work in"
            f" '{self.work_dir}'; remove one of them or rerun with --overwrite"
        )

    def _resume(self, manifest: dict[str, Any]) -> None:
        for stray in self.work_dir.iterdir():
            if stray.name.endswith(_TMP):
                stray.unlink()  # a part or manifest whose writer was killed
        self._manifest = manifest
        self._supersedes = bool(manifest.get("may_supersede"))
        if manifest.get("publishing") or manifest.get("adopting"):
            self._write_manifest(publishing=False, adopting=False)
        parts = self._part_paths()
        for part in parts:
            self._load_ids(part)
        self._next_part = _part_number(parts[-1]) + 1 if parts else 0
        self._work_ready = True

    def _read_manifest(self) -> dict[str, Any] | None:
        try:
            manifest = orjson.loads((self.work_dir / _MANIFEST).read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return None
        return manifest if isinstance(manifest, dict) else None

    def _finished_fingerprint(self) -> Any:
        """The fingerprint recorded in a finished output, or None if it has none."""
        if self.format == "parquet":
            try:
                metadata = pq.read_schema(self.path).metadata or {}
            except (pa.ArrowException, OSError):
                raise ResumeError(
                    f"'{self.path}' exists but is not a readable Parquet file; {_RERUN_HINT}"
                ) from None
            raw = metadata.get(FINGERPRINT_KEY)
        else:
            try:
                raw = orjson.loads(self.sidecar_path.read_bytes()).get("fingerprint")
            except (OSError, orjson.JSONDecodeError, AttributeError):
                raw = None
            raw = None if raw is None else orjson.dumps(raw)
        return None if raw is None else orjson.loads(raw)

    def _check_fingerprint(self, stored: Any) -> None:
        if stored is None:
            raise ResumeError(f"'{self.path}' exists and was not produced by llamba; {_RERUN_HINT}")
        if stored == self.fingerprint:
            return
        changed = _changed_keys(stored, self.fingerprint)
        raise ResumeError(
            f"'{self.path}' was produced by a different job (changed: {', '.join(changed)});"
            f" {_RERUN_HINT}"
        )

    def _load_ids(self, path: Path) -> None:
        """Index the ids (and error flags) of one stored file, in row order."""
        chunks = _parquet_ids(path) if self.format == "parquet" else _jsonl_ids(path)
        for ids, errors in chunks:
            self._hashes.append(_hash_many(ids))
            self._errors.append(errors)

    def _compute_done(self) -> None:
        hashes, errors = self._index()
        if not len(hashes):
            return
        # The newest row of an id decides: a retried id's new row supersedes its error row.
        unique, first_in_reverse = np.unique(hashes[::-1], return_index=True)
        latest_error = errors[::-1][first_in_reverse]
        self._stored = unique
        self._done = unique[~latest_error] if self.retry_errors else unique

    # -- writing --------------------------------------------------------------------

    def _ensure_work_dir(self) -> None:
        """Make the work dir ready for new parts, claiming or adopting what is there."""
        if self._work_ready:
            return
        if self._overwrite:
            self.path.unlink(missing_ok=True)
            self.sidecar_path.unlink(missing_ok=True)
            if self.work_dir.exists():
                shutil.rmtree(self.work_dir)
        self.work_dir.parent.mkdir(parents=True, exist_ok=True)
        self.work_dir.mkdir()
        self._manifest = {
            "fingerprint": self.fingerprint,
            "format": self.format,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "may_supersede": self._supersedes,
        }
        if self._finished_output:
            # The finished file becomes part 0; the manifest says so first, so a kill
            # between the two steps is completed on the next open.
            self._write_manifest(adopting=True)
            os.replace(self.path, self._part_path(0))
            _fsync_dir(self.work_dir)
            self.sidecar_path.unlink(missing_ok=True)
            self._write_manifest(adopting=False)
            self._next_part = 1
            self._finished_output = False
        else:
            self._write_manifest()
        _fsync_dir(self.path.parent)
        self._work_ready = True

    def _publish_part(self, rows: list[dict[str, Any]]) -> None:
        self._ensure_work_dir()
        if self._supersedes and not self._manifest.get("may_supersede"):
            self._write_manifest(may_supersede=True)  # before any superseding row lands
        part = self._part_path(self._next_part)
        tmp = _tmp_name(part)
        try:
            if self.format == "parquet":
                pq.write_table(_rows_to_table(rows), tmp)
                _fsync_file(tmp)
            else:
                with open(tmp, "wb") as stream:
                    stream.write(b"".join(_json_line(row) for row in rows))
                    stream.flush()
                    os.fsync(stream.fileno())
            os.replace(tmp, part)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.work_dir)
        self._next_part += 1
        self._hashes.append(_hash_many(str(row["id"]) for row in rows))
        self._errors.append(np.array([row.get("error") is not None for row in rows], bool))

    def _merge_and_publish(self) -> None:
        parts = self._part_paths()
        hashes, errors = self._index()
        keep = _newest_per_id(hashes) if self._supersedes else None
        kept_errors = errors if keep is None else errors[keep]
        self._write_manifest(publishing=True)
        tmp = self._publish_tmp
        try:
            if self.format == "parquet":
                metadata = {FINGERPRINT_KEY: orjson.dumps(self.fingerprint)}
                _merge_parquet_parts(parts, tmp, metadata=metadata, keep=keep)
                _fsync_file(tmp)
            else:
                with open(tmp, "wb") as stream:
                    _concat_jsonl(parts, stream, keep)
                    stream.flush()
                    os.fsync(stream.fileno())
            sidecar = {
                "fingerprint": self.fingerprint,
                "format": self.format,
                "rows": len(kept_errors),
                "errors": int(kept_errors.sum()),
                "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            _atomic_write(self.sidecar_path, orjson.dumps(sidecar, option=orjson.OPT_INDENT_2))
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.path.parent)
        shutil.rmtree(self.work_dir)
        _fsync_dir(self.path.parent)
        self._work_ready = False

    def _write_manifest(self, **changes: Any) -> None:
        self._manifest.update(changes)
        data = orjson.dumps(self._manifest, option=orjson.OPT_INDENT_2)
        _atomic_write(self.work_dir / _MANIFEST, data)

    # -- helpers --------------------------------------------------------------------

    def _index(self) -> tuple[np.ndarray, np.ndarray]:
        if not self._hashes:
            return _EMPTY, np.zeros(0, bool)
        return np.concatenate(self._hashes), np.concatenate(self._errors)

    def _part_path(self, number: int) -> Path:
        return self.work_dir / f"part-{number:06d}.{self.format}"

    def _part_paths(self) -> list[Path]:
        parts = [
            entry
            for entry in self.work_dir.iterdir()
            if (match := _PART.fullmatch(entry.name)) and match.group(2) == self.format
        ]
        return sorted(parts, key=_part_number)

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
        except (pa.ArrowException, orjson.JSONEncodeError) as exc:
            raise OutputError(f"cannot {verb} '{self.path}': {_first_line(exc)}") from None


_EMPTY = np.zeros(0, np.uint64)


def _normalized(fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """The fingerprint as it reads back from JSON, so stored and new ones compare equal."""
    value = orjson.loads(orjson.dumps(dict(fingerprint), default=str, option=_JSON_OPTIONS))
    assert isinstance(value, dict)
    return value


def _changed_keys(stored: Any, current: dict[str, Any]) -> list[str]:
    if not isinstance(stored, dict):
        return ["fingerprint"]
    missing = object()
    keys = list(current) + [key for key in stored if key not in current]
    return [key for key in keys if stored.get(key, missing) != current.get(key, missing)]


def _hash_one(row_id: str) -> int:
    digest = blake2b(row_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _hash_many(ids: Any) -> np.ndarray:
    digests = b"".join(
        blake2b(row_id.encode("utf-8", "surrogatepass"), digest_size=8).digest() for row_id in ids
    )
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


def _contains(sorted_hashes: np.ndarray, value: int) -> bool:
    if not len(sorted_hashes):
        return False
    key = np.uint64(value)
    position = int(np.searchsorted(sorted_hashes, key))
    return position < len(sorted_hashes) and sorted_hashes[position] == key


def _newest_per_id(hashes: np.ndarray) -> np.ndarray:
    """A mask over rows in write order keeping only the last row of each id."""
    keep = np.zeros(len(hashes), bool)
    if len(hashes):
        _, first_in_reverse = np.unique(hashes[::-1], return_index=True)
        keep[len(hashes) - 1 - first_in_reverse] = True
    return keep


def _parquet_ids(path: Path) -> Iterator[tuple[list[str], np.ndarray]]:
    """The ids and error flags of a Parquet file, read column-wise in batches."""
    try:
        with pq.ParquetFile(path) as parquet:
            names = parquet.schema_arrow.names
            if "id" not in names:
                raise OutputError(f"cannot resume from '{path}': it has no 'id' column")
            columns = ["id", "error"] if "error" in names else ["id"]
            for batch in parquet.iter_batches(batch_size=_ID_BATCH, columns=columns):
                ids = [str(value) for value in batch.column(0).to_pylist()]
                if len(columns) == 2:
                    errors = batch.column(1).is_valid().to_numpy(zero_copy_only=False)
                else:
                    errors = np.zeros(len(ids), bool)
                yield ids, np.asarray(errors, bool)
    except pa.ArrowException as exc:
        raise OutputError(f"cannot resume from '{path}': {_first_line(exc)}") from None


def _jsonl_ids(path: Path) -> Iterator[tuple[list[str], np.ndarray]]:
    """The ids and error flags of a JSON Lines file; blank lines are not rows."""
    ids: list[str] = []
    errors: list[bool] = []
    with open(path, "rb") as stream:
        for line_number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError:
                row = None
            if not isinstance(row, dict) or row.get("id") is None:
                raise OutputError(
                    f"cannot resume from '{path}': line {line_number} is not a row with an id"
                )
            ids.append(str(row["id"]))
            errors.append(row.get("error") is not None)
            if len(ids) >= _ID_BATCH:
                yield ids, np.array(errors, bool)
                ids, errors = [], []
    if ids:
        yield ids, np.array(errors, bool)


def _concat_jsonl(parts: list[Path], out: BinaryIO, keep: np.ndarray | None) -> None:
    """Append the parts' lines to `out`; with `keep`, only the rows it marks."""
    position = 0
    for part in parts:
        with open(part, "rb") as stream:
            if keep is None:
                last = b"\n"
                while block := stream.read(1 << 20):
                    out.write(block)
                    last = block[-1:]
                if last != b"\n":
                    out.write(b"\n")
                continue
            for line in stream:
                if not line.strip():
                    continue
                if keep[position]:
                    out.write(line if line.endswith(b"\n") else line + b"\n")
                position += 1


def _json_line(row: dict[str, Any]) -> bytes:
    return orjson.dumps(row, default=str, option=_JSON_OPTIONS) + b"\n"


def _part_number(part: Path) -> int:
    match = _PART.fullmatch(part.name)
    assert match is not None
    return int(match.group(1))


def _tmp_name(path: Path) -> Path:
    hidden = path.name if path.name.startswith(".") else f".{path.name}"
    return path.with_name(hidden + _TMP)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable; a no-op where directories cannot be fsynced."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- Parquet rows ---------------------------------------------------------------------
#
# Parts are written from Python rows, so each part's schema is inferred from its own
# rows: a column can be all-null in one part and a string in the next, int in one and
# float in another, or a struct with different fields.  The merge unifies the parts'
# schemas permissively and casts part by part.  A column whose values Arrow cannot
# type at all (a string in one row, a number in the next) is stored as text, non-string
# values as JSON, rather than failing the job.


def _rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    names: dict[str, None] = {}  # union of the rows' keys, in first-seen order
    for row in rows:
        names.update(dict.fromkeys(row))
    columns = [_column_array([row.get(name) for row in rows]) for name in names]
    return pa.Table.from_arrays(columns, names=list(names))


def _column_array(values: list[Any]) -> pa.Array:
    try:
        array = pa.array(values)
    except (pa.ArrowException, OverflowError, TypeError, ValueError):
        return pa.array([_text(value) for value in values], pa.string())
    if not _parquet_writable(array.type):
        return pa.array([_text(value) for value in values], pa.string())
    return array


def _parquet_writable(kind: pa.DataType) -> bool:
    """False for types Parquet cannot store, i.e. a struct without fields (from `{}`)."""
    if pa.types.is_struct(kind):
        fields = [kind.field(i) for i in range(kind.num_fields)]
        return bool(fields) and all(_parquet_writable(field.type) for field in fields)
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return _parquet_writable(kind.value_type)
    if pa.types.is_map(kind):
        return _parquet_writable(kind.key_type) and _parquet_writable(kind.item_type)
    return True


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return orjson.dumps(value, default=str, option=_JSON_OPTIONS).decode()


def _merge_parquet_parts(
    parts: list[Path], dest: Path, *, metadata: dict[bytes, bytes], keep: np.ndarray | None
) -> None:
    """Stream the parts into one Parquet file at `dest`, one batch in memory at a time.

    With `keep`, a mask over all rows of all parts in order, only the marked rows are
    written.
    """
    target, as_text = _unified_schema([pq.read_schema(part) for part in parts])
    target = target.with_metadata(metadata)
    position = 0
    pending: list[pa.Table] = []
    pending_rows = 0
    with pq.ParquetWriter(dest, target) as writer:
        for part in parts:
            with pq.ParquetFile(part) as parquet:
                for batch in parquet.iter_batches(batch_size=_MERGE_BATCH):
                    table = _conform(pa.Table.from_batches([batch]), target, as_text)
                    if keep is not None:
                        table = table.filter(pa.array(keep[position : position + len(table)]))
                    position += batch.num_rows
                    pending.append(table)
                    pending_rows += len(table)
                    if pending_rows >= _ROW_GROUP_ROWS:
                        writer.write_table(pa.concat_tables(pending))
                        pending, pending_rows = [], 0
        if pending:
            writer.write_table(pa.concat_tables(pending))
    if keep is not None and position != len(keep):
        raise OutputError(f"cannot merge the parts in '{dest.parent}': they changed during the job")


def _unified_schema(schemas: list[pa.Schema]) -> tuple[pa.Schema, set[str]]:
    """One schema for all parts, and the names of columns that must be stored as text."""
    candidates: dict[str, list[pa.Field]] = {}
    for schema in schemas:
        for field in schema:
            candidates.setdefault(field.name, []).append(field)
    if not candidates:
        return pa.schema([("id", pa.string()), ("error", pa.string())]), set()
    fields: list[pa.Field] = []
    as_text: set[str] = set()
    for name, versions in candidates.items():
        try:
            single = [pa.schema([field]) for field in versions]
            fields.append(pa.unify_schemas(single, promote_options="permissive").field(0))
        except pa.ArrowException:
            fields.append(pa.field(name, pa.string()))
            as_text.add(name)
    return pa.schema(fields), as_text


def _conform(table: pa.Table, target: pa.Schema, as_text: set[str]) -> pa.Table:
    """`table` with exactly the columns and types of `target` (missing ones all null)."""
    columns: list[pa.Array | pa.ChunkedArray] = []
    for field in target:
        if field.name not in table.column_names:
            columns.append(pa.nulls(len(table), field.type))
            continue
        column = table.column(field.name)
        if field.name in as_text:
            if not pa.types.is_string(column.type):
                column = pa.array([_text(value) for value in column.to_pylist()], pa.string())
        elif column.type != field.type:
            try:
                column = column.cast(field.type)
            except pa.ArrowException:
                # e.g. structs whose fields differ: rebuild from values, missing ones null
                column = pa.array(column.to_pylist(), type=field.type)
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=target)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
