"""What an output records about the job that wrote it, and the check that a rerun is
that job.

A job's fingerprint (the settings that shape its output) is recorded

- in unfinished work, by the work directory's manifest: `fingerprint`, `format`,
  `created`, and the store's flags: `may_supersede` (a row may rewrite an earlier
  id, so the final merge keeps the newest row per id), `adopting` (a finished output
  is being moved into the work directory as part 0) and `publishing` (the merged
  output is being renamed into place);
- in a finished output, as Parquet schema metadata under `FINGERPRINT_KEY`, and for
  both formats in the sidecar `.<name>.llamba.json` (`fingerprint`, `format`, `rows`,
  `errors`, `finished`).

Fingerprints are compared as they read back from JSON (`normalized`), so a rerun
with the same settings finds its own output; anything else is a `ResumeError` that
names the settings that changed, or says the file is not llamba's.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson

from llamba_cli.errors import OutputError, ResumeError
from llamba_cli.job.durable import OutputLock, atomic_write
from llamba_cli.job.layout import OutputLayout, check_location

FINGERPRINT_KEY = b"llamba.fingerprint"
RERUN_HINT = "rerun with --overwrite or choose another output path"
_JSON_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY


def normalized(fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """The fingerprint as it reads back from JSON, so stored and new ones compare equal."""
    value = orjson.loads(orjson.dumps(dict(fingerprint), default=str, option=_JSON_OPTIONS))
    assert isinstance(value, dict)
    return value


def new_manifest(fingerprint: dict[str, Any], fmt: str, *, may_supersede: bool) -> dict[str, Any]:
    """The manifest of a work directory created now."""
    return {
        "fingerprint": fingerprint,
        "format": fmt,
        "created": _now(),
        "may_supersede": may_supersede,
    }


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest at `path`, or None if it is missing or unreadable."""
    try:
        manifest = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) else None


def write_manifest(path: Path, manifest: Mapping[str, Any]) -> None:
    """Replace the manifest at `path` atomically."""
    atomic_write(path, orjson.dumps(manifest, option=orjson.OPT_INDENT_2))


def parquet_metadata(fingerprint: dict[str, Any]) -> dict[bytes, bytes]:
    """The schema metadata that marks a finished Parquet output as the job's."""
    return {FINGERPRINT_KEY: orjson.dumps(fingerprint)}


def write_sidecar(
    path: Path, fingerprint: dict[str, Any], fmt: str, rows: int, errors: int
) -> None:
    """Record a finished output's job, row count and error count at `path`, atomically."""
    sidecar = {
        "fingerprint": fingerprint,
        "format": fmt,
        "rows": rows,
        "errors": errors,
        "finished": _now(),
    }
    atomic_write(path, orjson.dumps(sidecar, option=orjson.OPT_INDENT_2))


def finished_fingerprint(layout: OutputLayout) -> Any:
    """The fingerprint recorded in the finished output, or None if it has none."""
    if layout.format == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            metadata = pq.read_schema(layout.path).metadata or {}
        except (pa.ArrowException, OSError):
            raise ResumeError(
                f"'{layout.path}' exists but is not a readable Parquet file; {RERUN_HINT}"
            ) from None
        raw = metadata.get(FINGERPRINT_KEY)
    else:
        try:
            raw = orjson.loads(layout.sidecar.read_bytes()).get("fingerprint")
        except (OSError, orjson.JSONDecodeError, AttributeError):
            raw = None
        raw = None if raw is None else orjson.dumps(raw)
    return None if raw is None else orjson.loads(raw)


def check_fingerprint(path: Path, stored: Any, fingerprint: Mapping[str, Any]) -> None:
    """ResumeError unless `stored` (a fingerprint read back from JSON, None when there
    is none) is `fingerprint`: the message names the settings that changed."""
    current = normalized(fingerprint)
    if stored is None:
        raise ResumeError(f"'{path}' exists and was not produced by llamba; {RERUN_HINT}")
    if stored == current:
        return
    changed = _changed_keys(stored, current)
    raise ResumeError(
        f"'{path}' was produced by a different job (changed: {', '.join(changed)}); {RERUN_HINT}"
    )


def preflight(path: str | Path, *, fingerprint: Mapping[str, Any], overwrite: bool = False) -> None:
    """What opening a store on `path` would refuse, checked without changing anything:
    the format, the location, another run holding the output, and (unless
    `overwrite`) existing output or work from a different job."""
    layout = OutputLayout.of(path)
    check_location(layout.path)
    holder = OutputLock.holder(layout.lock)
    if holder is not None:
        who = f"pid {holder}" if holder > 0 else "another process"
        raise OutputError(f"'{layout.path}' is being written by another llamba run ({who})")
    if overwrite:
        return
    current = normalized(fingerprint)
    manifest = read_manifest(layout.manifest) if layout.work_dir.is_dir() else None
    if manifest is not None:
        check_fingerprint(layout.path, manifest.get("fingerprint"), current)
    elif layout.path.exists():
        check_fingerprint(layout.path, finished_fingerprint(layout), current)


def _changed_keys(stored: Any, current: dict[str, Any]) -> list[str]:
    if not isinstance(stored, dict):
        return ["fingerprint"]
    missing = object()
    keys = list(current) + [key for key in stored if key not in current]
    return [key for key in keys if stored.get(key, missing) != current.get(key, missing)]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
