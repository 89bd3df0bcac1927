"""Running a job: input rows -> `Request`s -> engine -> output rows, streamed.

`Job` prepares everything a run needs (input, labels, model, prompt format) and
checks what can be checked before any row runs; `run_job` drives the engine over it
(`job.writer` turns rows into requests and results into output rows).  Nothing
here prints; progress goes to a `ProgressSink` the caller supplies (the CLI's rich
bar or plain log lines).  Memory stays flat whatever the input size: rows are read
lazily, the engine keeps a bounded queue, and results are written in input order
through a reorder buffer bounded by what is in flight.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from llamba_cli.engine import Engine, EngineConfig, Model, Request
from llamba_cli.errors import ConfigError, OutputError, RowError
from llamba_cli.job.formats import format_from_gguf, load_format
from llamba_cli.job.ids import SeenIds, id_hash
from llamba_cli.job.interrupt import Interrupted
from llamba_cli.job.layout import OUTPUT_FORMATS, check_location, output_format
from llamba_cli.job.models import ModelLoad, model_identity, resolve_model_path
from llamba_cli.job.prompts import PromptBuilder, PromptSpec
from llamba_cli.job.readers import InputRow, InputSource, ParquetSource, open_input
from llamba_cli.job.spec import JobSpec
from llamba_cli.job.store import OutputStore
from llamba_cli.job.structured import Constraint, load_constraint
from llamba_cli.job.summary import JobSummary, NoProgress, ProgressSink, write_metrics
from llamba_cli.job.vocab_cache import StoredVocab, prime_grammar_vocab, read_grammar_vocab
from llamba_cli.job.writer import ResultWriter

if TYPE_CHECKING:
    import pyarrow as pa

# Tokens a prompt may have beyond one per byte of its text: BOS, and a leading space a
# SentencePiece tokenizer adds (with a margin).
_TOKENIZER_EXTRA = 4


class RowWriter(Protocol):
    """Turns a job's input rows into engine requests, and finished requests into output
    rows (in input order, through the job's `OutputStore`)."""

    def requests(self) -> Iterator[Request]: ...
    def finished(self, req: Request) -> None: ...


class Job:
    """A prepared job: input opened, labels and columns checked, model loaded.

    `tasks` are the tasks a class runs.  A subclass (the batch task's
    `llamba_cli.openai.batch.BatchJob`, which sits above this layer) changes how input
    is checked (`check_input`), the output's id column (`id_field`) and schema, and how
    rows become requests and output (`writer`); callers pass it to `run_job`,
    `validate_job` and `dry_run` as their `opener`."""

    tasks: tuple[str, ...] = ("generate", "classify")
    id_field = "id"

    def __init__(
        self,
        spec: JobSpec,
        *,
        model: Model | ModelLoad | None = None,
        source: InputSource | None = None,
    ) -> None:
        if spec.task not in self.tasks:
            raise ConfigError(f"{type(self).__name__} does not run {spec.task!r} jobs")
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
        identity: dict[str, Any] | None = None
        stored_vocab: StoredVocab | None = None
        if model is None:
            engine = spec.engine
            model = ModelLoad(spec.model, n_gpu_layers=engine.n_gpu_layers, repack=engine.repack)
        if isinstance(model, ModelLoad):  # loading on its own thread: overlaps the above
            if model.path is not None:  # and so does what needs only the model's file
                identity = model_identity(model.path)
                if self.constraint is not None:
                    stored_vocab = read_grammar_vocab(model.path)
            if spec.output and OUTPUT_FORMATS.get(Path(spec.output).suffix.lower()) == "parquet":
                import pyarrow.parquet  # noqa: F401  (a Parquet output's Arrow loads beside it too)
            self.model_path, self.model = model.result()
        else:
            self.model_path, self.model = resolve_model_path(spec.model), model
        if spec.ctx > self.model.n_ctx_train:
            raise ConfigError(
                f"ctx ({spec.ctx}) is larger than the model's training context "
                f"({self.model.n_ctx_train})"
            )
        if self.constraint is not None:
            prime_grammar_vocab(self.model, self.model_path, stored_vocab)
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
        self.check_input()
        if self.labels is not None:
            self._check_label_tokens(self.labels)
        identity = identity or model_identity(self.model_path)
        self.fingerprint = spec.fingerprint(identity, self.format.name)
        self._max_prompt_bytes: int | None = None

    def check_input(self) -> None:
        """Fail before any row runs if the input cannot give prompts (model loaded)."""
        self.builder.check_columns(self.source.columns)

    def writer(self, store: OutputStore, summary: JobSummary, progress: ProgressSink) -> RowWriter:
        return ResultWriter(self, store, summary, progress)

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

    def _check_label_tokens(self, labels: tuple[str, ...]) -> None:
        """Every label must have tokens, and fit in a sequence after the shortest prompt
        (BOS and one token), or every row would fail."""
        for label in labels:
            n = len(self.model.tokenize(label, add_bos=False))
            if not n:
                raise ConfigError(f"label {label!r} has no tokens in this model's vocabulary")
            joined = len(self.model.tokenize(self.spec.label_delimiter + label, add_bos=False))
            if max(n, joined) + 2 > self.spec.ctx:
                raise ConfigError(
                    f"label {label[:40]!r} has {max(n, joined)} tokens: no prompt fits before it"
                    f" in a sequence of {self.spec.ctx} tokens (raise --ctx)"
                )

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

    def output_schema(self) -> pa.Schema:
        """The Parquet schema of this job's output (see `job.columns`)."""
        import pyarrow as pa

        from llamba_cli.job.columns import output_schema, plain_type

        constraint = self.constraint
        kept: list[tuple[str, pa.DataType]] = []
        for column in self.spec.keep_columns:
            kind = pa.string()
            if isinstance(self.source, ParquetSource):
                source_type = self.source.schema.field(column).type
                kind = source_type if plain_type(source_type) else pa.string()
            kept.append((column, kind))
        return output_schema(
            task=self.spec.task,
            labels=self.labels,
            samples=self.spec.n > 1,
            json_type=constraint.json_type if constraint is not None else None,
            with_json=constraint is not None and constraint.is_json,
            logprobs=getattr(self.spec.sampling, "logprobs", None) is not None,
            kept=kept,
        )

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
        """The prompt text of one row; RowError if the row cannot give one, or if its
        prompt is too long to fit in a sequence by its size alone (no tokenizing)."""
        if row.error is not None or row.data is None:
            raise RowError(row.error or "unreadable row")
        prompt = self.builder.build(row.data)
        if len(prompt) > self.spec.ctx:  # cheap: a token holds at least one byte
            size = len(prompt.encode("utf-8", "surrogatepass"))
            limit = self.max_prompt_bytes()
            if size > limit:
                raise RowError(
                    f"prompt is {size} bytes; a sequence of {self.spec.ctx} tokens (--ctx) "
                    f"holds at most {limit} bytes of this model's text"
                )
        return prompt

    def max_prompt_bytes(self) -> int:
        """The most bytes of text that can fit in `ctx` tokens: `ctx` times the longest
        token's text (measured once, over the whole vocabulary, on first use)."""
        if self._max_prompt_bytes is None:
            longest = max(len(self.model.token_text(t).encode()) for t in range(self.model.n_vocab))
            self._max_prompt_bytes = self.spec.ctx * max(longest, 1)
        return self._max_prompt_bytes

    def planned_requests(self) -> int | None:
        """At most how many engine requests a run submits, when the input's row count
        is known without parsing it (Parquet footer, JSON Lines line count); else None.
        An upper bound: rows already done, duplicates and other shards only lower it."""
        total = self.source.count_rows()
        if total is None:
            return None
        if self.spec.limit is not None:
            total = min(total, self.spec.limit)
        return total * self.spec.n

    def engine_config(self) -> EngineConfig:
        """The engine settings, sized to the work when its size is known (see
        `EngineConfig.sized_for`): a one-row job allocates one slot's KV, not 16, and
        when every request runs at once, KV for what its prompts and completions can
        fill, not `--ctx` tokens each."""
        config = self.spec.engine_config(str(self.model_path))
        requests = self.planned_requests()
        cells = None
        if requests is not None and requests <= config.slots:
            cells = self.planned_cells()
        return config.sized_for(requests, cells)

    def planned_cells(self) -> int:
        """At most how many KV cells the run's sequences hold, read ahead from the input
        (for a small input, whose requests all run at once).  A request holds its
        prompt, at most one token per byte of its text plus `_TOKENIZER_EXTRA` (BOS, a
        space the tokenizer may put in front), then its completion (`--max-tokens`) or
        its longest label's text; never more than `--ctx`.  Prefixes the prefix cache
        keeps are prompt prefixes, so with more than one request the prompts count
        twice.  Rows that make no prompt hold nothing."""
        spec = self.spec
        if self.labels is not None:
            after = len(spec.label_delimiter.encode()) + max(len(x.encode()) for x in self.labels)
        else:
            after = spec.sampling.max_tokens
        held = prompts = requests = 0
        for row in self.rows(None, JobSummary(task=spec.task, output=None)):
            try:
                text = self.prompt(row)
            except RowError:
                continue
            prompt = min(spec.ctx, len(text.encode("utf-8", "surrogatepass")) + _TOKENIZER_EXTRA)
            held += spec.n * min(spec.ctx, prompt + after)
            prompts += spec.n * prompt
            requests += spec.n
        return held + (prompts if requests > 1 else 0)

    def allocation(self) -> str:
        """What a run's engine would allocate, for `validate` and `--dry-run`."""
        config = self.engine_config()
        mib = config.n_ctx * self.model.kv_bytes_per_cell() / (1 << 20)
        if config.kv_cells is not None:  # sized to the input (`planned_cells`)
            holds = " (what the input's prompts and completions can fill)"
        elif config.prefix_cache:
            holds = f" incl. {config.prefix_cache_tokens} for shared prefixes"
        else:
            holds = ""
        return (
            f"{config.slots} slot{'s' if config.slots != 1 else ''} x {config.n_ctx_seq} "
            f"tokens (--ctx), KV cache {config.n_ctx} cells{holds}, about {mib:.0f} MiB"
        )


# Prepares the job of a spec: `Job`, or a subclass for tasks a higher layer defines.
class JobOpener(Protocol):
    """`Job` or a subclass: how `run_job`, `validate_job` and `dry_run` open a spec."""

    def __call__(self, spec: JobSpec, *, model: Model | ModelLoad | None = None) -> Job: ...


def read_paths(spec: JobSpec) -> list[Path]:
    """Files a job reads: none of them may be written as its output."""
    paths = [Path(spec.input), resolve_model_path(spec.model)]
    paths += [Path(p) for p in (spec.labels_file, spec.json_schema, spec.grammar) if p]
    if spec.format.endswith(".toml") or "/" in spec.format:
        paths.append(Path(spec.format))
    return [p.expanduser() for p in paths]


def check_outputs(spec: JobSpec) -> None:
    """Fail before any work if the output or metrics path can never be written, or is
    one of the files the job reads (through links too)."""
    if not spec.output:
        raise ConfigError("an output path is needed: -o/--output FILE (.parquet or .jsonl)")
    output = Path(spec.output).expanduser()
    output_format(output)
    check_location(output)
    written = [("output", output)]
    if spec.metrics_json:
        metrics = Path(spec.metrics_json).expanduser()
        if metrics.is_dir() or (metrics.exists() and not metrics.is_file()):
            raise OutputError(f"cannot write metrics to '{metrics}': not a regular file")
        check_location(metrics)
        if _same_file(metrics, output):
            raise OutputError(f"--metrics-json '{metrics}' is the output file")
        written.append(("--metrics-json", metrics))
    for what, path in written:
        for read in read_paths(spec):
            if _same_file(path, read):
                raise OutputError(
                    f"the {what} path '{path}' is a file this job reads ('{read}'); "
                    "choose another path"
                )


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except OSError:
        return False


def run_job(
    spec: JobSpec,
    progress: ProgressSink | None = None,
    *,
    opener: JobOpener = Job,
    model: ModelLoad | None = None,
) -> JobSummary:
    """Run `spec` to completion (or abort at `max_errors`), writing its output.

    Raises LlambaError subclasses for problems found before any row runs; a row's
    own problem becomes an error row.  On `Interrupted` (or KeyboardInterrupt) what
    was generated is flushed and stays resumable; the exception is re-raised with
    `kept` saying where.  `model`: the spec's model, already loading (a `ModelLoad`);
    the job takes it, or discards it if the job fails before that."""
    progress = progress or NoProgress()
    try:
        check_outputs(spec)
        job = opener(spec, model=model)
    except BaseException:
        if model is not None:
            model.discard()
        raise
    engine = Engine(job.engine_config(), model=job.model)
    try:
        return _run(job, engine, progress)
    finally:
        engine.close()


def _run(job: Job, engine: Engine, progress: ProgressSink) -> JobSummary:
    spec = job.spec
    assert spec.output is not None
    path = Path(spec.output).expanduser()
    store = OutputStore(
        path,
        fingerprint=job.fingerprint,
        overwrite=spec.overwrite,
        retry_errors=spec.retry_errors,
        flush_rows=spec.flush_rows,
        flush_seconds=spec.flush_seconds,
        # JSON Lines has no schema; without one, the job never loads Arrow.
        schema=job.output_schema() if output_format(path) == "parquet" else None,
        id_field=job.id_field,
    )
    summary = JobSummary(task=spec.task, output=str(store.path), fingerprint=job.fingerprint)
    try:
        if store.done_count:
            progress.note(f"resuming: {store.done_count} rows already in {store.path.name}")
        total = job.source.count_rows()
        if total is not None:
            shard = spec.shard_index()
            total = max(0, (total // shard[1] if shard else total) - store.done_count)
            if spec.limit is not None:
                total = min(total, spec.limit)
            total *= spec.n
        progress.start(total, "samples" if spec.n > 1 else "rows")
        t0 = time.perf_counter()
        writer = job.writer(store, summary, progress)
        for req in engine.run(writer.requests()):
            writer.finished(req)
            if spec.max_errors is not None and summary.errors > spec.max_errors:
                summary.aborted = (
                    f"more than {spec.max_errors} rows ended in error (--max-errors); what was"
                    " written is kept: fix the input and rerun with --retry-errors, or rerun"
                    " with a higher --max-errors"
                )
                break
        summary.wall_seconds = time.perf_counter() - t0
        _collect_stats(summary, engine)
        if summary.aborted:
            store.close()
        else:
            store.finalize()
    except BaseException as exc:
        store.close()
        if isinstance(exc, Interrupted):
            exc.kept = _kept(store)
        raise
    summary.errors_fail = spec.max_errors is None and summary.errors > 0
    if spec.metrics_json:
        write_metrics(spec.metrics_json, summary)
    return summary


def _kept(store: OutputStore) -> str:
    total = store.done_count + store.rows_kept
    if not store.work_dir.exists():
        return "nothing was written yet"
    return f"{total} rows are kept in '{store.work_dir}'; rerun the same command to resume"


def _collect_stats(summary: JobSummary, engine: Engine) -> None:
    st = engine.stats
    summary.prompt_tokens = st.prompt_tokens
    summary.prompt_tokens_evaluated = st.prompt_tokens_evaluated
    summary.prompt_tokens_reused = st.prompt_tokens_reused
    summary.generated_tokens = st.generated_tokens
