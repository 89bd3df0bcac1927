"""`JobSpec`: everything a job needs, from a job file, CLI flags, or both.

The spec nests the engine's own config classes instead of copying their fields:
`sampling` is a `SamplingParams` and `engine` an `EngineConfig` (its `model_path` is
filled in once the job has resolved its model).  `SETTINGS` lists every setting a
job takes, under one flat name each: the job's own fields, then every field of
`SamplingParams` and `EngineConfig` (except the few a job sets itself), so a field
added to either class is a job-file key, a CLI flag and part of the fingerprint at
once.  Two engine fields go by the names llama.cpp users know: `ctx` (`n_ctx_seq`)
and `threads` (`n_threads`).

A job file is TOML.  Keys may sit at the top level or in any of the tables
`[prompt]`, `[sampling]`, `[engine]`, `[run]` (tables only group keys; names are
unique across them).  Relative paths are relative to the job file, and `~` is
expanded.  CLI flags override the file.  The spec is validated once, when built,
with one clear message.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamba_cli.engine import EngineConfig, SamplingParams
from llamba_cli.errors import ConfigError
from llamba_cli.job.userfiles import read_text

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TASKS = ("generate", "classify", "batch")
# Settings of the job itself that a batch job refuses: each request's body carries its
# prompt and sampling (`openai.batch`); so do all of `SamplingParams`.
BATCH_REFUSED = (
    "prompt_column",
    "messages_column",
    "template",
    "system",
    "keep_columns",
    "n",
    "json_schema",
    "grammar",
    "labels",
    "labels_file",
    "label_delimiter",
)
_PATH_KEYS = ("input", "output", "model", "metrics_json", "json_schema", "grammar", "labels_file")
_TABLES = ("prompt", "sampling", "engine", "run", "classify")
# Fields of the engine's classes a job does not take from its user: it resolves the
# model path, seeds every row itself (from `seed`, the id and the sample), and a
# logit bias table has no flat spelling.
_NOT_SETTINGS = {"model_path", "seed", "logit_bias"}
_RENAMED = {"n_ctx_seq": "ctx", "n_threads": "threads"}


def _no_engine() -> EngineConfig:
    return EngineConfig(model_path="")


@dataclass(frozen=True)
class JobSpec:
    task: str
    input: str
    output: str | None = None
    model: str | None = None  # None: the embedded Gemma 3 270M
    # prompt
    id_column: str | None = None
    prompt_column: str = "prompt"
    messages_column: str = "messages"
    template: str | None = None
    system: str | None = None
    format: str = "auto"
    keep_columns: tuple[str, ...] = ()
    # generation
    seed: int = 0  # base seed: each row draws from (seed, id, sample)
    n: int = 1
    json_schema: str | None = None
    grammar: str | None = None
    # classification
    labels: tuple[str, ...] = ()
    labels_file: str | None = None
    label_delimiter: str = " "
    # run control
    limit: int | None = None
    shard: str | None = None  # "I/N"
    overwrite: bool = False
    retry_errors: bool = False
    max_errors: int | None = None
    flush_rows: int = 256
    flush_seconds: float = 10.0
    metrics_json: str | None = None
    # the engine's own config classes
    sampling: SamplingParams = field(default_factory=SamplingParams)
    engine: EngineConfig = field(default_factory=_no_engine)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.n < 1:
            raise ConfigError(f"n must be >= 1, got {self.n}")
        if self.task == "classify":
            if self.n != 1:
                raise ConfigError("n applies to generate only")
            if self.json_schema or self.grammar:
                raise ConfigError("json-schema and grammar apply to generate only")
            if getattr(self.sampling, "logprobs", None) is not None:
                raise ConfigError("logprobs applies to generate only")
        if self.task == "batch":
            self._check_batch()
        if self.json_schema and self.grammar:
            raise ConfigError("give either --json-schema or --grammar, not both")
        if self.limit is not None and self.limit < 0:
            raise ConfigError(f"limit must be >= 0, got {self.limit}")
        if self.max_errors is not None and self.max_errors < 0:
            raise ConfigError(f"max-errors must be >= 0, got {self.max_errors}")
        if self.flush_rows < 1 or not 0 < self.flush_seconds < math.inf:
            raise ConfigError("flush-rows must be >= 1 and flush-seconds a finite number > 0")
        if not 0 <= self.seed < 1 << 64:
            raise ConfigError(f"seed must be between 0 and {(1 << 64) - 1}, got {self.seed}")
        if not -1 <= self.engine.n_gpu_layers < 1 << 31:
            raise ConfigError(
                f"n-gpu-layers must be -1 (all) or more, got {self.engine.n_gpu_layers}"
            )
        if self.id_column == "":
            raise ConfigError("id-column must not be empty")
        self.shard_index()  # validates the shard spelling

    def _check_batch(self) -> None:
        """A batch job's rows are identified by `custom_id` and bring their own prompt
        and sampling in their bodies: the settings that would say otherwise are refused."""
        if self.id_column is None:
            object.__setattr__(self, "id_column", "custom_id")
        elif self.id_column != "custom_id":
            raise ConfigError("a batch job's rows are identified by custom_id (no id-column)")
        given = [k for k in BATCH_REFUSED if getattr(self, k) != SETTINGS[k].default_value()]
        unset = SamplingParams()
        given += [
            f.name
            for f in dataclasses.fields(SamplingParams)
            if getattr(self.sampling, f.name) != getattr(unset, f.name)
        ]
        if given:
            raise ConfigError(
                f"{given[0].replace('_', '-')} does not apply to a batch job: each request's"
                " body carries its prompt and sampling"
            )

    # -- derived --------------------------------------------------------------------

    @property
    def ctx(self) -> int:
        """Tokens per sequence, prompt and completion."""
        return self.engine.n_ctx_seq

    def engine_config(self, model_path: str) -> EngineConfig:
        """The engine settings of this job for the model at `model_path`."""
        return dataclasses.replace(self.engine, model_path=model_path)

    def shard_index(self) -> tuple[int, int] | None:
        if self.shard is None:
            return None
        try:
            i_s, n_s = self.shard.split("/")
            i, n = int(i_s), int(n_s)
        except ValueError:
            raise ConfigError(f"shard must look like I/N (e.g. 0/4), got {self.shard!r}") from None
        if not (n >= 1 and 0 <= i < n):
            raise ConfigError(f"shard I/N needs 0 <= I < N, got {self.shard!r}")
        return i, n

    def row_sampling(self, seed: int, extra_stop: tuple[str, ...] = ()) -> SamplingParams:
        """The sampling of one row: its own seed, and the format's stop strings added."""
        stop = tuple(dict.fromkeys(self.sampling.stop + extra_stop))
        return dataclasses.replace(self.sampling, seed=seed, stop=stop)

    def label_list(self) -> tuple[str, ...]:
        """The label set: `labels`, or one label per non-empty line of `labels_file`."""
        if self.labels_file:
            text = read_text(self.labels_file, "labels file")
            return tuple(line.strip() for line in text.splitlines() if line.strip())
        return self.labels

    def fingerprint(self, model_identity: dict[str, Any], prompt_format: str) -> dict[str, Any]:
        """What determines the output's content. Resuming with a different one is refused."""
        fp: dict[str, Any] = {
            "task": self.task,
            "model": model_identity,
            "format": prompt_format,
            "id_column": self.id_column,
            "ctx": self.ctx,
            "prompt": {
                "prompt_column": self.prompt_column,
                "messages_column": self.messages_column,
                "template": self.template,
                "system": self.system,
                "keep_columns": list(self.keep_columns),
            },
            "seed": self.seed,
        }
        if self.task == "generate":
            s = dataclasses.asdict(self.sampling)
            s.pop("seed")
            fp["sampling"] = s
            fp["n"] = self.n
            fp["constraint"] = _file_digest(self.json_schema or self.grammar)
        elif self.task == "classify":
            fp["labels"] = list(self.label_list())
            fp["label_delimiter"] = self.label_delimiter
        return fp


def _file_digest(path: str | None) -> str | None:
    if not path:
        return None
    try:
        return hashlib.sha256(read_text(path, "file").encode()).hexdigest()[:16]
    except ConfigError:
        return None


# -- settings: one flat name for every knob ---------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One setting a job takes: its flat `key` (job-file key; CLI flag with dashes),
    where it lives (`section` "job", "sampling" or "engine", and `field` there), its
    type as written in the class, and its default (`default_factory` for computed
    ones, such as the thread count)."""

    key: str
    section: str
    field: str
    type: str
    default: Any = None
    default_factory: Callable[[], Any] | None = None

    def default_value(self) -> Any:
        return self.default_factory() if self.default_factory is not None else self.default


def _settings_of(cls: Any, section: str) -> dict[str, Setting]:
    found: dict[str, Setting] = {}
    for f in dataclasses.fields(cls):
        if section == "job" and f.name in ("sampling", "engine"):
            continue
        if section != "job" and f.name in _NOT_SETTINGS:
            continue
        key = _RENAMED.get(f.name, f.name)
        factory = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        default = f.default if f.default is not dataclasses.MISSING else None
        found[key] = Setting(key, section, f.name, str(f.type), default, factory)
    return found


SETTINGS: dict[str, Setting] = {
    **_settings_of(JobSpec, "job"),
    **_settings_of(SamplingParams, "sampling"),
    **_settings_of(EngineConfig, "engine"),
}


def load_job_file(path: str | Path) -> dict[str, Any]:
    """Read a job file into a flat dict of settings (paths made absolute)."""
    p = Path(path).expanduser()
    try:
        raw = tomllib.loads(read_text(p, "job file"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"job file {p} is not valid TOML: {e}") from None
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _TABLES and isinstance(value, dict):
            for k, v in value.items():
                _put(flat, k, v, p)
        else:
            _put(flat, key, value, p)
    for key in _PATH_KEYS:
        if isinstance(flat.get(key), str):
            given = Path(flat[key]).expanduser()
            flat[key] = str(given if given.is_absolute() else (p.parent / given).resolve())
    return flat


def _put(flat: dict[str, Any], key: str, value: Any, path: Path) -> None:
    key = key.replace("-", "_")
    if key not in SETTINGS:
        known = ", ".join(sorted(SETTINGS))
        raise ConfigError(f"unknown key {key!r} in job file {path} (known keys: {known})")
    if key in flat:
        raise ConfigError(f"key {key!r} is set twice in job file {path}")
    flat[key] = value


def build_spec(values: dict[str, Any]) -> JobSpec:
    """A JobSpec from flat settings (job file merged with CLI overrides), type-checked;
    the sampling and engine sections are validated by their own classes."""
    sections: dict[str, dict[str, Any]] = {"job": {}, "sampling": {}, "engine": {}}
    for key, value in values.items():
        if value is None:
            continue
        setting = SETTINGS.get(key)
        if setting is None:
            raise ConfigError(f"unknown job setting {key!r}")
        clean = _coerce(key, value, setting.type)
        if key in _PATH_KEYS and isinstance(clean, str):
            clean = str(Path(clean).expanduser())
        sections[setting.section][setting.field] = clean
    job = sections["job"]
    for required in ("task", "input"):
        if required not in job:
            raise ConfigError(f"a job needs {required!r}")
    return JobSpec(
        **job,
        sampling=SamplingParams(**sections["sampling"]),
        engine=EngineConfig(model_path="", **sections["engine"]),
    )


_TRI_STATE = {"auto": None, "on": True, "off": False}


def _coerce(key: str, value: Any, type_name: str) -> Any:
    def bad(kind: str) -> ConfigError:
        return ConfigError(f"{key} must be {kind}, got {value!r}")

    if type_name.startswith("bool | None") or type_name == "bool | None":
        if isinstance(value, str) and value in _TRI_STATE:
            return _TRI_STATE[value]
        if not isinstance(value, bool):
            raise bad("auto, on or off")
        return value
    if "tuple" in type_name:
        if isinstance(value, str):
            return (value,)
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise bad("a list of strings")
        return tuple(value)
    if type_name.startswith("bool"):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if type_name.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if type_name.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad("a number")
        return float(value)
    if type_name.startswith("str"):
        if not isinstance(value, str):
            raise bad("a string")
        return value
    return value
