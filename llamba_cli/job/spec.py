"""`JobSpec`: everything a job needs, from a job file, CLI flags, or both.

A job file is TOML.  Keys may sit at the top level or in any of the tables
`[prompt]`, `[sampling]`, `[engine]`, `[run]` (tables only group keys; names are
unique across them).  Relative paths are relative to the job file.  CLI flags
override the file.  The spec is validated once, here, with one clear message.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import sys
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
# A batch job's requests carry their own prompts and sampling (`job.batch`).
_NOT_BATCH = (
    "prompt_column",
    "messages_column",
    "template",
    "system",
    "keep_columns",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repeat_penalty",
    "presence_penalty",
    "frequency_penalty",
    "max_tokens",
    "stop",
    "n",
    "json_schema",
    "grammar",
    "labels",
    "labels_file",
    "label_delimiter",
)
_PATH_KEYS = ("input", "output", "model", "metrics_json", "json_schema", "grammar", "labels_file")
_TABLES = ("prompt", "sampling", "engine", "run", "classify")
# Defaults come from the engine's own config classes, so the two never drift apart.
_SAMPLING = SamplingParams()
_ENGINE: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(EngineConfig)}


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
    # sampling
    temperature: float = _SAMPLING.temperature
    top_k: int = _SAMPLING.top_k
    top_p: float = _SAMPLING.top_p
    min_p: float = _SAMPLING.min_p
    repeat_penalty: float = _SAMPLING.repeat_penalty
    presence_penalty: float = _SAMPLING.presence_penalty
    frequency_penalty: float = _SAMPLING.frequency_penalty
    max_tokens: int = _SAMPLING.max_tokens
    stop: tuple[str, ...] = ()
    seed: int = 0
    n: int = 1
    json_schema: str | None = None
    grammar: str | None = None
    # classification
    labels: tuple[str, ...] = ()
    labels_file: str | None = None
    label_delimiter: str = " "
    # engine
    slots: int = _ENGINE["slots"]
    ctx: int = _ENGINE["n_ctx_seq"]
    n_batch: int = _ENGINE["n_batch"]
    threads: int | None = None
    flash_attn: str = _ENGINE["flash_attn"]
    n_gpu_layers: int = _ENGINE["n_gpu_layers"]
    prefix_cache: bool = _ENGINE["prefix_cache"]
    # run control
    limit: int | None = None
    shard: str | None = None  # "I/N"
    overwrite: bool = False
    retry_errors: bool = False
    max_errors: int | None = None
    flush_rows: int = 256
    flush_seconds: float = 10.0
    metrics_json: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

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
        if not -1 <= self.n_gpu_layers < 1 << 31:
            raise ConfigError(f"n-gpu-layers must be -1 (all) or more, got {self.n_gpu_layers}")
        if self.id_column == "":
            raise ConfigError("id-column must not be empty")
        self.shard_index()  # validates the shard spelling
        self.sampling()  # validates sampling values
        self.engine_config("")  # validates engine values, before any model loads

    def _check_batch(self) -> None:
        """A batch job's rows are identified by `custom_id` and bring their own prompt
        and sampling in their bodies: the settings that would say otherwise are refused."""
        if self.id_column is None:
            object.__setattr__(self, "id_column", "custom_id")
        elif self.id_column != "custom_id":
            raise ConfigError("a batch job's rows are identified by custom_id (no id-column)")
        given = [name for name in _NOT_BATCH if getattr(self, name) != _FIELDS[name].default]
        if given:
            raise ConfigError(
                f"{given[0].replace('_', '-')} does not apply to a batch job: each request's"
                " body carries its prompt and sampling"
            )

    def engine_config(self, model_path: str) -> EngineConfig:
        """The engine settings of this job for the model at `model_path`."""
        kwargs: dict[str, Any] = {}
        if self.threads is not None:
            kwargs["n_threads"] = self.threads
        return EngineConfig(
            model_path=model_path,
            slots=self.slots,
            n_ctx_seq=self.ctx,
            n_batch=self.n_batch,
            flash_attn=self.flash_attn,
            n_gpu_layers=self.n_gpu_layers,
            prefix_cache=self.prefix_cache,
            **kwargs,
        )

    # -- derived --------------------------------------------------------------------

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

    def sampling(self, seed: int | None = None, extra_stop: tuple[str, ...] = ()) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            repeat_penalty=self.repeat_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            max_tokens=self.max_tokens,
            stop=tuple(dict.fromkeys(self.stop + extra_stop)),
            seed=seed,
        )

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
            s = dataclasses.asdict(self.sampling())
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


_FIELDS = {f.name: f for f in dataclasses.fields(JobSpec) if f.name != "extra"}


def load_job_file(path: str | Path) -> dict[str, Any]:
    """Read a job file into a flat dict of JobSpec fields (paths made absolute)."""
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
    if key not in _FIELDS:
        known = ", ".join(sorted(_FIELDS))
        raise ConfigError(f"unknown key {key!r} in job file {path} (known keys: {known})")
    if key in flat:
        raise ConfigError(f"key {key!r} is set twice in job file {path}")
    flat[key] = value


def build_spec(values: dict[str, Any]) -> JobSpec:
    """A JobSpec from flat values (job file merged with CLI overrides), type-checked."""
    clean: dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            continue
        f = _FIELDS.get(key)
        if f is None:
            raise ConfigError(f"unknown job setting {key!r}")
        clean[key] = _coerce(key, value, str(f.type))
        if key in _PATH_KEYS and isinstance(clean[key], str) and clean[key].startswith("~"):
            clean[key] = str(Path(clean[key]).expanduser())
    for required in ("task", "input"):
        if required not in clean:
            raise ConfigError(f"a job needs {required!r}")
    return JobSpec(**clean)


def _coerce(key: str, value: Any, type_name: str) -> Any:
    def bad(kind: str) -> ConfigError:
        return ConfigError(f"{key} must be {kind}, got {value!r}")

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
