"""The installed `llamba` command and `python -m llamba_cli`.

Kept apart from `app` so that a job's model starts loading (`preload.speculate`)
before Typer and the rest of the command line's machinery are imported: on a one-row
job the load is most of the wall time, and everything else can overlap it.
"""

from __future__ import annotations

import sys


def entry() -> None:
    from llamba_cli.cli import preload

    preload.speculate(sys.argv[1:])
    from llamba_cli.cli.app import entry as run_and_exit

    run_and_exit()
