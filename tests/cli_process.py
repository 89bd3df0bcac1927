"""Running the real `llamba` command as a subprocess, the way cron and CI run it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def llamba(*args: str, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m llamba_cli ARGS` in `cwd`; stdout/stderr captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "llamba_cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )
