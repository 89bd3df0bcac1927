"""The command line's options, derived from the job's settings (`job.spec.SETTINGS`).

Every setting is a flag named after it (`max_tokens` -> `--max-tokens`), typed and
defaulted as its dataclass field is: so a field added to `SamplingParams` or
`EngineConfig` is a flag, with its default in the help, without an edit here.  This
module adds only what a dataclass cannot say: one line of help for the settings
users reach for, the short spellings llama.cpp and OpenAI users know (`-c`, `-b`,
`-np`, `--temp`, ...), and which panel of `--help` a flag sits in.

`--ray` and the fields of `RayOptions` (`--address`, `--actors`, ...) join the same
table, derived the same way: they say where a job runs, not what it computes, so
they are flags of the job commands but not settings of a job file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import typer

from llamba_cli.errors import ConfigError
from llamba_cli.job.ray_data.options import RayOptions
from llamba_cli.job.spec import SETTINGS, Setting

# Not flags: where the job comes from is the command's argument.
_ARGUMENTS = {"task", "input"}
# Comma-separated on the command line, lists in a job file.
_COMMA_LISTS = {"labels", "keep_columns"}

_ALIASES: dict[str, tuple[str, ...]] = {
    "output": ("-o",),
    "model": ("-m",),
    "temperature": ("--temp",),
    "slots": ("-np",),
    "ctx": ("-c",),
    "n_batch": ("-b",),
    "threads": ("-t",),
    "flash_attn": ("-fa",),
    "n_gpu_layers": ("-ngl",),
}

_PANELS = {"sampling": "Sampling", "engine": "Engine", "ray": "Ray"}
_FLAGS = ("job", "ray")  # sections whose bool fields are plain switches (--overwrite, --ray)
_JOB_PANELS = {
    "Prompt": {
        "id_column", "prompt_column", "messages_column", "template", "system", "format",
        "keep_columns",
    },
    "Model": {"model"},
    "Sampling": {"seed", "n", "json_schema", "grammar"},
    "Classify": {"labels", "labels_file", "label_delimiter"},
    "Run": {
        "limit", "shard", "overwrite", "retry_errors", "max_errors", "flush_rows",
        "flush_seconds", "metrics_json",
    },
}  # fmt: skip

_HELP: dict[str, str] = {
    # job
    "output": "Output file: .parquet or .jsonl.",
    "model": "GGUF model path (default: $LLAMBA_MODEL, else the embedded Gemma 3 270M).",
    "id_column": "Column holding row ids; rows without one get #N, N their position.",
    "prompt_column": "Column with prompt text.",
    "messages_column": "Column with a chat messages list.",
    "template": "Build the prompt from columns: 'Review: {text}\\nSentiment:'.",
    "system": "System message (a leading paragraph for plain prompts).",
    "format": "Prompt format: auto (the model's chat template, else plain), gguf, plain, "
    "chatml, llama3, gemma, mistral, or a .toml path.",
    "keep_columns": "Input columns to copy into the output, comma-separated.",
    "seed": "Base seed; each row draws from its own stream of (seed, id, sample).",
    "n": "Samples per prompt (generate).",
    "json_schema": "JSON Schema file: every row is valid JSON of that shape.",
    "grammar": "GBNF grammar file constraining the output.",
    "labels": "Comma-separated labels (classify).",
    "labels_file": "File with one label per line (classify).",
    "label_delimiter": "Joins prompt and label unless the prompt ends in whitespace.",
    "limit": "Process at most this many rows in this run.",
    "shard": "I/N: only rows whose id hashes to shard I of N.",
    "overwrite": "Replace existing output instead of resuming.",
    "retry_errors": "On resume, run rows that ended in error again.",
    "max_errors": "Tolerate this many error rows (exit 0); abort once exceeded.",
    "flush_rows": "Make output durable every N rows.",
    "flush_seconds": "...and at least every S seconds.",
    "metrics_json": "Write a machine-readable run summary here.",
    # sampling
    "temperature": "0 = greedy.",
    "top_k": "0 = off.",
    "top_p": "1 = off.",
    "min_p": "0 = off.",
    "repeat_penalty": "1 = off.",
    "presence_penalty": "OpenAI's, in [-2, 2].",
    "frequency_penalty": "OpenAI's, in [-2, 2].",
    "repeat_last_n": "Generated tokens the penalties look at.",
    "max_tokens": "Most tokens generated per row.",
    "stop": "Stop string (repeatable); excluded from the output.",
    "ignore_eos": "Generate past end-of-generation tokens, up to --max-tokens.",
    "logprobs": "Write a logprobs column: each token's logprob and this many top "
    "alternatives (0-20).",
    # engine
    "slots": "Sequences decoded together.",
    "ctx": "Most tokens per sequence, prompt + completion. Unlike llama-server's -c, "
    "this is per sequence: the KV cache holds slots x ctx.",
    "n_batch": "Most tokens per llama_decode; at least slots + 8 (the prefix cache's sequences).",
    "threads": "CPU threads: the core count, halved above 8 cores.",
    "flash_attn": "auto, on or off.",
    "n_gpu_layers": "Layers offloaded to the GPU (-1 = all, in a GPU build).",
    "repack": "llama.cpp's weight repacking: auto (on unless the CPU has AMX), on or off.",
    "prefix_cache": "Compute shared prompt prefixes once.",
    "prefix_cache_tokens": "KV cells set aside for cached prefixes.",
    "prefix_min_tokens": "Shortest prefix worth sharing, in tokens.",
    "lookahead": "Requests queued ahead of the running ones.",
    "kv_cells": "Override the KV cache size (default: slots x ctx + prefix cache).",
    # ray
    "ray": "Run on a Ray cluster (pip install 'llamba[ray]'); the output is a folder of parts.",
    "address": "Ray cluster: auto, ray://host:10001, or host:port (default: $RAY_ADDRESS, "
    "else a new local instance).",
    "actors": "Engines running at once, one per actor (default: the cluster's CPUs / "
    "threads per actor).",
    "threads_per_actor": "CPUs each actor reserves and runs llama.cpp on (default: the "
    "cluster's CPUs / --actors, else up to 8; --threads does not apply).",
    "block_rows": "Rows per block: one actor call and one output part (default 8 x --slots).",
}


@dataclass(frozen=True)
class Option:
    """One flag: the setting it sets, its annotation for typer, and typer's option."""

    key: str
    annotation: Any
    info: Any
    flag: bool  # a plain on/off switch: False when absent
    section: str  # the setting's section: "job", "sampling", "engine", or "ray"

    @property
    def generate_only(self) -> bool:
        return self.section == "sampling" or self.key in (
            "n",
            "json_schema",
            "grammar",
        )

    @property
    def classify_only(self) -> bool:
        return self.key in ("labels", "labels_file", "label_delimiter")

    def value(self, given: Any) -> Any:
        """The setting's value from what typer parsed (None: not given)."""
        if given is None or (self.flag and given is False):
            return None
        if self.key in _COMMA_LISTS:
            return tuple(v.strip() for v in given.split(",") if v.strip())
        if isinstance(given, list):
            return tuple(given) or None
        return given


def _panel(setting: Setting) -> str:
    if setting.section in _PANELS:
        return _PANELS[setting.section]
    return next((name for name, keys in _JOB_PANELS.items() if setting.key in keys), "Run")


def _default_text(setting: Setting) -> str | None:
    default = setting.default_value()
    if setting.default_factory is not None:  # computed on this machine, e.g. threads
        return f"{default} here"
    if setting.type.startswith("bool | None"):
        return "auto"
    if default is None or default == () or (setting.section in _FLAGS and default is False):
        return None
    if isinstance(default, bool):
        return "on" if default else "off"
    return repr(default) if isinstance(default, str) else str(default)


def _option(setting: Setting) -> Option:
    key, kind = setting.key, setting.type
    names = ["--" + key.replace("_", "-"), *_ALIASES.get(key, ())]
    help_text = _HELP.get(key, f"{setting.section} setting {setting.field}.")
    default = _default_text(setting)
    if default is not None:
        help_text = f"{help_text} (default: {default})"
    flag = False
    if kind.startswith("bool | None"):
        annotation: Any = str | None  # auto, on or off
    elif kind == "bool" and setting.section in _FLAGS:
        annotation, flag = bool, True
    elif kind == "bool":
        annotation = bool | None
        names = [f"--{key.replace('_', '-')}/--no-{key.replace('_', '-')}"]
    elif key in _COMMA_LISTS:
        annotation = str | None
    elif kind.startswith("tuple"):
        annotation = list[str] | None
    elif kind.startswith("int"):
        annotation = int | None
    elif kind.startswith("float"):
        annotation = float | None
    else:
        annotation = str | None
    info = typer.Option(*names, help=help_text, rich_help_panel=_panel(setting))
    return Option(key, annotation, info, flag, setting.section)


# `--ray`, then one flag per field of `RayOptions`: where a job runs.
RAY_SETTINGS: dict[str, Setting] = {
    "ray": Setting("ray", "ray", "ray", "bool", False),
    **{
        f.name: Setting(f.name, "ray", f.name, str(f.type), f.default)
        for f in dataclasses.fields(RayOptions)
    },
}

OPTIONS: dict[str, Option] = {
    **{key: _option(setting) for key, setting in SETTINGS.items() if key not in _ARGUMENTS},
    **{key: _option(setting) for key, setting in RAY_SETTINGS.items()},
}


def take_ray(values: dict[str, Any]) -> RayOptions | None:
    """Remove the Ray flags from a command's arguments: `RayOptions` with --ray, else
    None (ConfigError if a Ray-only flag was given without --ray)."""
    given = {key: values.pop(key, None) for key in RAY_SETTINGS}
    if not given.pop("ray"):
        extra = [key for key, value in given.items() if value is not None]
        if extra:
            raise ConfigError(f"--{extra[0].replace('_', '-')} applies only with --ray")
        return None
    return RayOptions(**{key: value for key, value in given.items() if value is not None})
