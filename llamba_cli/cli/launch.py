"""The installed `llamba` command and `python -m llamba_cli`.

Kept apart from `app` so that a job's model starts loading (`preload.speculate`)
before Typer and the rest of the command line's machinery are imported: on a one-row
job the load is most of the wall time, and everything else can overlap it.
"""

from __future__ import annotations

import os
import sys


def entry() -> None:
    argv = sys.argv[1:]
    # numpy's OpenBLAS starts a thread per core at import, and they spin for a while:
    # beside a model loading (and later llama.cpp's own threads) on a small machine
    # they take a core away (a one-row job's load: 0.65 -> 0.59 s on 2 cores).  No
    # llamba code runs BLAS; a user's own setting is kept.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    # Commands without options need no parser: the same output, a tenth of a second sooner.
    if argv in (["formats"], ["version"]):
        from llamba_cli.cli import listing

        if argv[0] == "formats":
            listing.print_formats()
        else:
            listing.print_version()
        return
    try:
        from llamba_cli.cli import preload

        preload.speculate(argv)
        from llamba_cli.cli.app import entry as run_and_exit
    except KeyboardInterrupt:  # Ctrl-C before the command has started: nothing written
        print("llamba: error: interrupted before the command started", file=sys.stderr)
        os._exit(130)  # a guessed load may be running: nothing to wait for
    run_and_exit()
