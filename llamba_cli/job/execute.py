"""Running a job: input rows -> `Request`s -> engine -> output rows, streamed.

Nothing here prints; progress goes to a `ProgressSink` the caller supplies (the
CLI's rich bar or plain log lines).  Memory stays flat whatever the input size:
rows are read lazily, the engine keeps a bounded queue, and results are written
in input order through a reorder buffer bounded by what is in flight.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson

from llamba_cli.engine import Engine, EngineConfig, Model, Request, normalize
from llamba_cli.errors import ConfigError, OutputError, RowError
from llamba_cli.job.models import model_identity, resolve_model_path
from llamba_cli.job.prompts import PromptBuilder, PromptSpec, format_from_gguf, load_format
from llamba_cli.job.readers import InputRow, InputSource, open_input
from llamba_cli.job.seen import SeenIds
from llamba_cli.job.spec import JobSpec
from llamba_cli.job.store import OutputStore
from llamba_cli.job.structured import Constraint, load_constraint


class ProgressSink(Protocol):
    def start(self, total: int | None, unit: str) -> None: ...
    def advance(self, rows: int, errors: int, tokens: int) -> None: ...
    def note(self, text: str) -> None: ...


class NoProgress:
    def start(self, total: int | None, unit: str) -> None:
        pass

    def advance(self, rows: int, errors: int, tokens: int) -> None:
        pass

    def note(self, text: str) -> None:
        pass


@dataclass
class JobSummary:
    """What a run did; `exit_code` follows the documented contract (0 / 1)."""

    task: str
    output: str | None
    rows_written: int = 0
    errors: int = 0
    skipped_done: int = 0
    duplicates: int = 0
    duplicate_examples: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    prompt_tokens_evaluated: int = 0
    prompt_tokens_reused: int = 0
    generated_tokens: int = 0
    wall_seconds: float = 0.0
    aborted: str | None = None
    errors_fail: bool = False  # errors make the exit code 1 (no --max-errors given)
    fingerprint: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def rows_per_second(self) -> float:
        return self.rows_written / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        return 1 if (self.errors_fail or self.duplicates or self.aborted) else 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "output": self.output,
            "rows_written": self.rows_written,
            "errors": self.errors,
            "skipped_already_done": self.skipped_done,
            "duplicate_ids": self.duplicates,
            "prompt_tokens": self.prompt_tokens,
            "prompt_tokens_evaluated": self.prompt_tokens_evaluated,
            "prompt_tokens_reused": self.prompt_tokens_reused,
            "generated_tokens": self.generated_tokens,
            "tokens_per_second": round(self.tokens_per_second, 2),
            "rows_per_second": round(self.rows_per_second, 3),
            "wall_seconds": round(self.wall_seconds, 3),
            "aborted": self.aborted,
            "exit_code": self.exit_code,
            "fingerprint": self.fingerprint,
        }


def row_seed(base: int, row_id: str, sample: int) -> int:
    """A row's own seed: stable across runs, shards and batch composition."""
    digest = hashlib.blake2b(f"{base}\0{row_id}\0{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def id_hash(row_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(row_id.encode(), digest_size=8).digest(), "little")


class Job:
    """A prepared job: input opened, labels and columns checked, model loaded."""

    def __init__(
        self, spec: JobSpec, *, model: Model | None = None, source: InputSource | None = None
    ) -> None:
        self.spec = spec
        if source is None:  # a Ray actor passes the rows of its current batch instead
            source = open_input(spec.input, id_column=spec.id_column)
        self.source: InputSource = source
        self.labels = self._check_labels() if spec.task == "classify" else None
        missing = [c for c in spec.keep_columns if c not in self.source.columns]
        if missing:
            raise ConfigError(
                f"--keep-columns: no column {missing[0]!r} in {self.source.path.name} "
                f"(columns: {', '.join(self.source.columns)})"
            )
        # Read and convert before the model loads, compile against its vocabulary after.
        self.constraint: Constraint | None = load_constraint(spec.json_schema, spec.grammar)
        self.model_path = resolve_model_path(spec.model)
        self.model = model or Model(self.model_path, n_gpu_layers=spec.n_gpu_layers)
        if self.constraint is not None:
            self.constraint.check(self.model)
        self.format = self._prompt_format()
        self.builder = PromptBuilder(
            PromptSpec(
                prompt_column=spec.prompt_column,
                messages_column=spec.messages_column,
                template=spec.template,
                system=spec.system,
            ),
            self.format,
            bos_token=self.model.token_text(self.model.bos),
            eos_token=self.model.token_text(self.model.eos),
        )
        self.builder.check_columns(self.source.columns)
        if self.labels is not None:
            for label in self.labels:
                if not self.model.tokenize(label, add_bos=False):
                    raise ConfigError(f"label {label!r} has no tokens in this model's vocabulary")
        self.fingerprint = spec.fingerprint(model_identity(self.model_path), self.format.name)

    def _check_labels(self) -> tuple[str, ...]:
        labels = self.spec.label_list()
        if not labels:
            raise ConfigError("classify needs labels: --labels a,b,c or --labels-file FILE")
        if len(labels) < 2:
            raise ConfigError(f"classify needs at least two labels, got {list(labels)}")
        if any(not label.strip() for label in labels):
            raise ConfigError("labels must not be empty or whitespace")
        seen: set[str] = set()
        for label in labels:
            if label in seen:
                raise ConfigError(f"duplicate label {label!r}")
            seen.add(label)
        return labels

    def _prompt_format(self) -> Any:
        name = self.spec.format
        if name == "auto":
            tmpl = self.model.chat_template
            return format_from_gguf(tmpl) if tmpl else load_format("plain")
        if name == "gguf":
            tmpl = self.model.chat_template
            if not tmpl:
                raise ConfigError("--format gguf: this model file has no chat template")
            return format_from_gguf(tmpl)
        return load_format(name)

    # -- rows -------------------------------------------------------------------------

    def rows(self, store: OutputStore | None, summary: JobSummary) -> Iterator[InputRow]:
        """Input rows this run should process: shard, duplicates, done and limit applied."""
        shard = self.spec.shard_index()
        seen = SeenIds()
        taken = 0
        for row in self.source:
            h = id_hash(row.id)
            if shard is not None and h % shard[1] != shard[0]:
                continue
            if not seen.add(h):
                summary.duplicates += 1
                if len(summary.duplicate_examples) < 5:
                    summary.duplicate_examples.append(row.id)
                continue
            if store is not None and store.is_done(row.id):
                summary.skipped_done += 1
                continue
            if self.spec.limit is not None and taken >= self.spec.limit:
                return
            taken += 1
            yield row

    def prompt(self, row: InputRow) -> str:
        """The prompt text of one row; RowError if the row cannot give one."""
        if row.error is not None or row.data is None:
            raise RowError(row.error or "unreadable row")
        return self.builder.build(row.data)

    def engine_config(self) -> EngineConfig:
        s = self.spec
        kwargs: dict[str, Any] = {}
        if s.threads is not None:
            kwargs["n_threads"] = s.threads
        return EngineConfig(
            model_path=str(self.model_path),
            slots=s.slots,
            n_ctx_seq=s.ctx,
            n_batch=s.n_batch,
            flash_attn=s.flash_attn,
            n_gpu_layers=s.n_gpu_layers,
            prefix_cache=s.prefix_cache,
            **kwargs,
        )


def run_job(spec: JobSpec, progress: ProgressSink | None = None) -> JobSummary:
    """Run `spec` to completion (or abort at `max_errors`), writing its output.

    Raises LlambaError subclasses for problems found before any row runs; a row's
    own problem becomes an error row.  On KeyboardInterrupt what was written stays
    resumable."""
    progress = progress or NoProgress()
    if not spec.output:
        raise ConfigError("an output path is needed: -o/--output FILE (.parquet or .jsonl)")
    job = Job(spec)
    store = OutputStore(
        spec.output,
        fingerprint=job.fingerprint,
        overwrite=spec.overwrite,
        retry_errors=spec.retry_errors,
        flush_rows=spec.flush_rows,
        flush_seconds=spec.flush_seconds,
    )
    summary = JobSummary(task=spec.task, output=str(store.path), fingerprint=job.fingerprint)
    if store.done_count:
        progress.note(f"resuming: {store.done_count} rows already in {store.path.name}")
    engine = Engine(job.engine_config(), model=job.model)
    total = job.source.count_rows()
    if total is not None:
        shard = spec.shard_index()
        total = max(0, (total // shard[1] if shard else total) - store.done_count)
        if spec.limit is not None:
            total = min(total, spec.limit)
        total *= spec.n
    progress.start(total, "samples" if spec.n > 1 else "rows")
    t0 = time.perf_counter()
    writer = _ResultWriter(job, store, summary, progress)
    try:
        for req in engine.run(writer.requests()):
            writer.finished(req)
            if spec.max_errors is not None and summary.errors > spec.max_errors:
                summary.aborted = f"more than {spec.max_errors} rows ended in error (--max-errors)"
                break
        summary.wall_seconds = time.perf_counter() - t0
        _collect_stats(summary, engine)
        if summary.aborted:
            store.close()
        else:
            store.finalize()
    except BaseException:
        store.close()
        raise
    finally:
        engine.close()
    summary.errors_fail = spec.max_errors is None and summary.errors > 0
    if spec.metrics_json:
        write_metrics(spec.metrics_json, summary)
    return summary


def _collect_stats(summary: JobSummary, engine: Engine) -> None:
    st = engine.stats
    summary.prompt_tokens = st.prompt_tokens
    summary.prompt_tokens_evaluated = st.prompt_tokens_evaluated
    summary.prompt_tokens_reused = st.prompt_tokens_reused
    summary.generated_tokens = st.generated_tokens


def write_metrics(path: str, summary: JobSummary) -> None:
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(orjson.dumps(summary.as_dict(), option=orjson.OPT_INDENT_2))
        tmp.replace(p)
    except OSError as e:
        raise OutputError(f"cannot write metrics to {p}: {e.strerror or e}") from None


class _ResultWriter:
    """Turns rows into requests and finished requests into output rows, in input order."""

    def __init__(
        self, job: Job, store: OutputStore, summary: JobSummary, progress: ProgressSink
    ) -> None:
        self.job = job
        self.store = store
        self.summary = summary
        self.progress = progress
        self.meta: dict[int, tuple[InputRow, int]] = {}
        self.pending: dict[int, Request] = {}
        self.next_out = 0

    def requests(self) -> Iterator[Request]:
        spec = self.job.spec
        seq = 0
        labels = self.job.labels
        grammar = self.job.constraint.gbnf if self.job.constraint is not None else None
        for row in self.job.rows(self.store, self.summary):
            try:
                prompt, error = self.job.prompt(row), None
            except RowError as e:
                prompt, error = "", str(e)
            for sample in range(spec.n):
                params = spec.sampling(row_seed(spec.seed, row.id, sample), self.job.format.stop)
                req = Request(
                    id=seq,
                    prompt=prompt,
                    params=params,
                    labels=labels,
                    label_delimiter=spec.label_delimiter,
                    sample=sample,
                    grammar_text=grammar,
                )
                if error is not None:
                    req.finish("error", error)
                self.meta[seq] = (row, sample)
                seq += 1
                yield req

    def finished(self, req: Request) -> None:
        self.pending[req.id] = req
        while self.next_out in self.pending:
            done = self.pending.pop(self.next_out)
            row, sample = self.meta.pop(self.next_out)
            self.next_out += 1
            self._write(done, row, sample)

    def _write(self, req: Request, row: InputRow, sample: int) -> None:
        spec = self.job.spec
        out: dict[str, Any] = {"id": row.id}
        if spec.n > 1:
            out["sample"] = sample
        constraint = self.job.constraint
        with_json = constraint is not None and constraint.is_json
        json_value: Any = None
        if constraint is not None and with_json and req.error is None:
            try:
                json_value = constraint.json_value(req.text, self.store.format)
            except ValueError as e:  # the grammar rules this out; never pass broken JSON on
                req.error = f"output is not valid JSON: {e}"
        if self.job.labels is None:
            out["text"] = req.text if req.error is None else None
            if with_json:
                out["json"] = json_value
            out.update(
                finish_reason=req.finish_reason,
                prompt_tokens=req.prompt_tokens,
                completion_tokens=req.completion_tokens,
            )
        else:
            out.update(_classification_columns(self.job.labels, req.label_logprobs))
            out["prompt_tokens"] = req.prompt_tokens
        out["error"] = req.error
        data = row.data or {}
        for col in spec.keep_columns:
            out[col if col not in out else f"input_{col}"] = data.get(col)
        self.store.write(out)
        self.summary.rows_written += 1
        failed = req.error is not None
        self.summary.errors += failed
        self.progress.advance(1, int(failed), req.completion_tokens)


def _classification_columns(
    labels: tuple[str, ...], logprobs: list[float] | None
) -> dict[str, Any]:
    """`label`, `confidence`, then `p_<label>` and `logprob_<label>` per label."""
    cols: dict[str, Any] = {}
    if logprobs is None:
        cols["label"] = None
        cols["confidence"] = None
        cols.update({f"p_{lab}": None for lab in labels})
        cols.update({f"logprob_{lab}": None for lab in labels})
        return cols
    probs = normalize(logprobs)
    best = max(range(len(labels)), key=probs.__getitem__)
    cols["label"] = labels[best]
    cols["confidence"] = probs[best]
    cols.update({f"p_{lab}": p for lab, p in zip(labels, probs, strict=True)})
    cols.update({f"logprob_{lab}": lp for lab, lp in zip(labels, logprobs, strict=True)})
    return cols
