"""Durable file operations: atomic writes, fsyncs, and the lock on a job's output.

Everything that must survive a crash goes through here: a file is written to a
temporary name beside its destination, fsynced, renamed over it, and the directory
fsynced, so a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable
from pathlib import Path

from llamba_cli.errors import OutputError

TMP_SUFFIX = ".tmp"

try:  # POSIX; elsewhere runs are not locked against each other
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def tmp_name(path: Path) -> Path:
    """The temporary name `path` is written under before it is renamed into place."""
    hidden = path.name if path.name.startswith(".") else f".{path.name}"
    return path.with_name(hidden + TMP_SUFFIX)


def atomic_replace(path: Path, write: Callable[[Path], object]) -> None:
    """Replace `path` with what `write(tmp)` writes to a temporary file beside it:
    then fsync, rename, fsync of the directory.  On any failure the temporary file
    is removed and `path` is left as it was."""
    tmp = tmp_name(path)
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` (see `atomic_replace`)."""
    atomic_replace(path, lambda tmp: tmp.write_bytes(data))


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
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


class OutputLock:
    """An exclusive lock on one output, held by one process for the life of its run.

    The lock is `flock` on a small file beside the output (`.<name>.llamba.lock`)
    holding the holder's pid.  A second run on the same output fails at once with
    `OutputError` naming that pid; a run that dies (even by `kill -9`) releases it,
    since the kernel drops the lock with the process.  The file is removed on
    `release`; a lock taken on a file that its previous holder removed meanwhile is
    taken again on the new one.  Where `flock` does not exist or is refused by the
    filesystem, runs are not locked.
    """

    def __init__(self, path: Path, output: Path) -> None:
        self.path = path
        self._fd: int | None = None
        if fcntl is None:
            return
        for _ in range(16):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read_pid(fd)
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    return  # the filesystem does not lock: run unlocked
                who = f"pid {holder}" if holder else "another process"
                raise OutputError(
                    f"'{output}' is being written by another llamba run ({who}); wait for it"
                    " to finish, or choose another output path"
                ) from None
            if _same_file(fd, path):
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self._fd = fd
                return
            os.close(fd)  # its holder removed it between our open and our lock: again
        raise OutputError(f"cannot lock '{output}': its lock file keeps changing")

    def release(self) -> None:
        """Remove the lock file and unlock (in that order, so no one locks a removed file
        and believes it holds the lock)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            if _same_file(fd, self.path):
                self.path.unlink()
        os.close(fd)

    def __del__(self) -> None:
        # Dropped without `release` (the run died): unlock as the kernel would on exit,
        # leaving the file, which the next holder takes over.
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    @staticmethod
    def holder(path: Path) -> int | None:
        """The pid holding the lock at `path`, or None when nobody does."""
        if fcntl is None or not path.exists():
            return None
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _read_pid(fd) or -1
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
