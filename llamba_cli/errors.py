"""The one exception tree of llamba.

Every error a user can cause is a `LlambaError`; the CLI turns each into one line
on stderr and the exit code below, in one place (`llamba_cli.cli.app`).  Anything
else that escapes is a bug and is reported as such.

    LlambaError
    ├── ConfigError      bad flag, job file, label set, template or schema  (exit 2)
    │   └── TemplateError  a prompt format / chat template that fails to render
    ├── ModelError       missing, unreadable or non-GGUF model; load failure (exit 2)
    ├── InputError       unreadable input file, missing column               (exit 2)
    ├── OutputError      cannot write or publish the output                  (exit 2)
    │   └── ResumeError  existing output made by a different job             (exit 2)
    ├── EngineError      llama.cpp failed in a way no retry can fix          (exit 3)
    └── QueueFull        the engine's queue is full: try again later  (a server's 429)
"""

from __future__ import annotations


class LlambaError(Exception):
    """Base of every error llamba reports to a user as one line."""

    exit_code = 2


class ConfigError(LlambaError):
    """A configuration value (flag, job file, labels, schema) is invalid."""


class TemplateError(ConfigError):
    """A prompt format or chat template cannot be loaded or rendered."""


class ModelError(LlambaError):
    """The model file is missing, unreadable, not GGUF, or failed to load."""


class InputError(LlambaError):
    """The input file cannot be read, or lacks a needed column."""


class OutputError(LlambaError):
    """The output cannot be written or published."""


class ResumeError(OutputError):
    """Existing output was produced by a different job (fingerprint mismatch)."""


class EngineError(LlambaError):
    """llama.cpp failed in a way that retrying with a smaller batch cannot fix."""

    exit_code = 3


class QueueFull(LlambaError):
    """A front end's queue of waiting requests is full; the request was not accepted."""


class RowError(Exception):
    """One input row cannot be processed (missing column, bad messages, too long).

    Never stops a job: the row is written with this message in its `error` column.
    """
