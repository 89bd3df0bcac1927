"""Row ids as 64-bit hashes: one hasher for sharding, duplicate detection and resume.

`id_hash` is the only place an id becomes a number (blake2b, 8 bytes, little endian,
UTF-8 with lone surrogates passed through), so a row's shard, its duplicate check and
its entry in an output's index always agree.  `SeenIds` remembers the ids of a
streamed input compactly; `StoredIds` indexes the rows an output already holds.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from hashlib import blake2b
from pathlib import Path

import numpy as np
import orjson

from llamba_cli.errors import OutputError

_EMPTY = np.zeros(0, np.uint64)
_ID_BATCH = 65_536


def _digest(row_id: str) -> bytes:
    return blake2b(row_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()


def id_hash(row_id: str) -> int:
    """The 64-bit hash of one id."""
    return int.from_bytes(_digest(row_id), "little")


def id_hashes(ids: Iterable[str]) -> np.ndarray:
    """`id_hash` of many ids, as a uint64 array."""
    digests = b"".join(_digest(row_id) for row_id in ids)
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


class SeenIds:
    """A compact set of id hashes, for duplicate detection over streamed input.

    A Python set of ints costs ~60 bytes an id (600 MB at 10M rows); this keeps sorted
    uint64 runs (8 bytes an id) plus a small set of the most recent ids, merging runs
    LSM-style so a lookup touches only a logarithmic number of them.
    """

    def __init__(self, buffer_size: int = 1 << 16) -> None:
        self._buffer_size = buffer_size
        self._recent: set[int] = set()
        self._runs: list[np.ndarray] = []  # sorted, unique, sizes decreasing

    def __len__(self) -> int:
        return len(self._recent) + sum(len(r) for r in self._runs)

    def __contains__(self, h: int) -> bool:
        if h in self._recent:
            return True
        v = np.uint64(h)
        for run in self._runs:
            i = int(np.searchsorted(run, v))
            if i < len(run) and run[i] == v:
                return True
        return False

    def add(self, h: int) -> bool:
        """Add `h`; False if it was already there."""
        if h in self:
            return False
        self._recent.add(h)
        if len(self._recent) >= self._buffer_size:
            self._flush()
        return True

    def _flush(self) -> None:
        run = np.fromiter(self._recent, dtype=np.uint64, count=len(self._recent))
        run.sort()
        self._recent = set()
        self._runs.append(run)
        # Merge while a run is at least half its predecessor: O(log n) runs in all.
        while len(self._runs) >= 2 and 2 * len(self._runs[-1]) >= len(self._runs[-2]):
            b = self._runs.pop()
            a = self._runs.pop()
            merged = np.concatenate([a, b])
            merged.sort(kind="stable")
            self._runs.append(merged)


class StoredIds:
    """The rows an output holds, in write order: each one's id hash and error flag.

    About 9 bytes a row.  `freeze` computes, once the stored files are read, which
    ids count as done: every stored id, or with `retry_errors` only those whose
    newest row has no error.  Stored files hold the id in the column `id_field`.
    """

    def __init__(self, id_field: str = "id") -> None:
        self.id_field = id_field
        self._hashes: list[np.ndarray] = []  # per part, in order ...
        self._errors: list[np.ndarray] = []  # ... and whether each row has an error
        self.stored = _EMPTY  # sorted unique hashes of every stored id
        self.done = _EMPTY  # sorted unique hashes of the ids that count as done

    def add(self, hashes: np.ndarray, errors: np.ndarray) -> None:
        self._hashes.append(hashes)
        self._errors.append(errors)

    def add_rows(self, ids: Iterable[str], errors: Iterable[bool]) -> None:
        self.add(id_hashes(ids), np.fromiter(errors, dtype=bool))

    def add_file(self, path: Path, fmt: str) -> None:
        """Index the ids (and error flags) of one stored file, in row order."""
        reader = _parquet_ids if fmt == "parquet" else _jsonl_ids
        chunks = reader(path, self.id_field)
        for ids, errors in chunks:
            self.add(id_hashes(ids), errors)

    def all(self) -> tuple[np.ndarray, np.ndarray]:
        """Every row's hash and error flag, in write order."""
        if not self._hashes:
            return _EMPTY, np.zeros(0, bool)
        return np.concatenate(self._hashes), np.concatenate(self._errors)

    def freeze(self, retry_errors: bool) -> None:
        hashes, errors = self.all()
        if not len(hashes):
            return
        # The newest row of an id decides: a retried id's new row supersedes its error row.
        unique, first_in_reverse = np.unique(hashes[::-1], return_index=True)
        latest_error = errors[::-1][first_in_reverse]
        self.stored = unique
        self.done = unique[~latest_error] if retry_errors else unique

    def newest_per_id(self) -> np.ndarray:
        """A mask over rows in write order keeping only the last row of each id."""
        hashes, _ = self.all()
        keep = np.zeros(len(hashes), bool)
        if len(hashes):
            _, first_in_reverse = np.unique(hashes[::-1], return_index=True)
            keep[len(hashes) - 1 - first_in_reverse] = True
        return keep


def contains(sorted_hashes: np.ndarray, value: int) -> bool:
    """Whether `value` is in the sorted array `sorted_hashes`."""
    if not len(sorted_hashes):
        return False
    key = np.uint64(value)
    position = int(np.searchsorted(sorted_hashes, key))
    return position < len(sorted_hashes) and sorted_hashes[position] == key


def _parquet_ids(path: Path, field: str) -> Iterator[tuple[list[str], np.ndarray]]:
    """The ids (column `field`) and error flags of a Parquet file, read in batches."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(path) as parquet:
            names = parquet.schema_arrow.names
            if field not in names:
                raise OutputError(f"cannot resume from '{path}': it has no {field!r} column")
            columns = [field, "error"] if "error" in names else [field]
            for batch in parquet.iter_batches(batch_size=_ID_BATCH, columns=columns):
                ids = [str(value) for value in batch.column(0).to_pylist()]
                if len(columns) == 2:
                    errors = batch.column(1).is_valid().to_numpy(zero_copy_only=False)
                else:
                    errors = np.zeros(len(ids), bool)
                yield ids, np.asarray(errors, bool)
    except pa.ArrowException as exc:
        raise OutputError(f"cannot resume from '{path}': {_first_line(exc)}") from None


def _jsonl_ids(path: Path, field: str) -> Iterator[tuple[list[str], np.ndarray]]:
    """The ids (key `field`) and error flags of a JSON Lines file; blank lines are not rows."""
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
            if not isinstance(row, dict) or row.get(field) is None:
                raise OutputError(
                    f"cannot resume from '{path}': line {line_number} is not a row with an id"
                )
            ids.append(str(row[field]))
            errors.append(row.get("error") is not None)
            if len(ids) >= _ID_BATCH:
                yield ids, np.array(errors, bool)
                ids, errors = [], []
    if ids:
        yield ids, np.array(errors, bool)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
