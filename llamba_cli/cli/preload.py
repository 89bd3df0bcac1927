"""Start loading a job's (or the server's) model before the command line is parsed.

Parsing the options (Typer builds a validator per option) and importing what runs a
job take a good part of a small job's start-up, and none of it needs the model; the
model's load runs in llama.cpp with the GIL released.  So `entry()` guesses the
model from the raw arguments (`--model`/`-m`, else the job file's `model`, else
$LLAMBA_MODEL or the embedded one) and starts loading it at once; `take(...)` hands
that load to the job or the server when the parsed options ask for the same model
with the same load settings, and otherwise discards it and starts the right one.
A wrong guess costs a wasted load, never a wrong model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from llamba_cli.errors import LlambaError

if TYPE_CHECKING:
    from llamba_cli.job.models import ModelLoad

# `validate` and `--dry-run` load the model too (to tokenize, and to say what a run
# would allocate).
_LOADS_A_MODEL = ("generate", "classify", "run", "validate", "serve")
_JOB_FILE_COMMANDS = ("run", "validate")
# Flags that change what or whether anything loads: with any of them, no guess.
_NO_GUESS = ("-h", "--help", "-ngl", "--n-gpu-layers", "--repack")

_guess: ModelLoad | None = None
# The taken guess, kept until the process ends: `entry()` leaves with os._exit right
# after the job, and the operating system frees a model faster than llama.cpp does.
_taken: ModelLoad | None = None


def speculate(argv: Sequence[str]) -> None:
    """Start loading the model that `argv` (without the program name) will most
    likely use; nothing when the command runs no job or the guess is unsure."""
    global _guess
    if not argv or argv[0] not in _LOADS_A_MODEL:
        return
    if any(a in _NO_GUESS or a.startswith(("--ray", "--n-gpu-layers=", "--repack=")) for a in argv):
        return
    model = _model_flag(argv)
    if model is None and argv[0] in _JOB_FILE_COMMANDS:
        model, unsure = _job_file_model(argv)
        if unsure:
            return
    from llamba_cli.job.models import ModelLoad, embedded_model_ready

    if not (model or os.environ.get("LLAMBA_MODEL")) and not embedded_model_ready():
        # The first run assembles the embedded model into the cache: a long write that
        # belongs to the run itself, where a signal cleans up and says so.
        return
    _guess = ModelLoad(model)


def take(model: str | None, *, n_gpu_layers: int = -1, repack: bool | None = None) -> ModelLoad:
    """The load of `model` with these settings: the guessed one when it matches, else a
    new one."""
    global _guess, _taken
    from llamba_cli.job.models import ModelLoad

    guess, _guess = _guess, None
    if guess is not None:
        if guess.serves(model, n_gpu_layers=n_gpu_layers, repack=repack):
            _taken = guess
            return guess
        guess.discard()
    return ModelLoad(model, n_gpu_layers=n_gpu_layers, repack=repack)


def _model_flag(argv: Sequence[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg in ("-m", "--model") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--model="):
            return arg.partition("=")[2]
    return None


def _job_file_model(argv: Sequence[str]) -> tuple[str | None, bool]:
    """The job file's `model` (None: its default), and whether the guess is unsure."""
    from llamba_cli.job.spec import load_job_file

    if len(argv) < 2 or argv[1].startswith("-"):
        return None, True
    try:
        values = load_job_file(argv[1])
    except (LlambaError, OSError):
        return None, True  # the real parse says what is wrong
    if "n_gpu_layers" in values or "repack" in values:
        return None, True
    model = values.get("model")
    return (model, False) if model is None or isinstance(model, str) else (None, True)
