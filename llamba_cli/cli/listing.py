"""What `llamba formats` and `llamba version` print.

Apart from the Typer app so that `launch.entry` can answer these two, which take no
options, without importing and running the command-line parser (most of their time).
"""

from __future__ import annotations

from llamba_cli import __version__
from llamba_cli.job.formats import list_formats, load_format


def print_formats() -> None:
    from rich.console import Console
    from rich.text import Text

    out = Console(highlight=False, markup=False)
    for name in list_formats():
        fmt = load_format(name)
        out.print(Text.assemble((f"{name:10}", "bold"), " ", fmt.description))


def print_version() -> None:
    print(f"llamba {__version__}")
