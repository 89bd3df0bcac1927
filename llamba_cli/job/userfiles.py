"""Reading the small text files a job names (labels, schemas, grammars, formats).

One place decides what such a file may be: a regular file (a FIFO or a device would
block the job or never end), of bounded size, in UTF-8.  Anything else is a
`ConfigError` with one line naming the file.
"""

from __future__ import annotations

from pathlib import Path

from llamba_cli.errors import ConfigError

# Labels, schemas, grammars and prompt formats are small; a bigger file is a mistake.
MAX_BYTES = 16 << 20


def read_text(path: str | Path, what: str) -> str:
    """The UTF-8 text of `path`; `what` names the file in messages ("labels file")."""
    p = Path(path).expanduser()
    where = f"cannot read {what} '{p}'"
    try:
        if not p.exists():
            raise ConfigError(f"{where}: no such file")
        if p.is_dir():
            raise ConfigError(f"{where}: is a directory")
        if not p.is_file():
            raise ConfigError(f"{where}: not a regular file")
        if p.stat().st_size > MAX_BYTES:
            raise ConfigError(f"{where}: larger than {MAX_BYTES >> 20} MiB")
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{where}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not UTF-8 text") from None
