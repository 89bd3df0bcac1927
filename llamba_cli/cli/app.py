"""The `llamba` command line.

All four job commands (`generate`, `classify`, `run`, `validate`) take the same
options; they differ only in where the job comes from.  Every `LlambaError` is
turned into one line on stderr and its exit code here, in `main()`, and nowhere
else.  Exit codes: 0 all rows succeeded; 1 some rows ended in error (or the run
aborted at --max-errors); 2 usage, configuration, input, model or output error;
3 llama.cpp failed; 130 interrupted.
"""

from __future__ import annotations

import inspect
import os
import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from llamba_cli import __version__

try:  # recent typer vendors its own copy of click
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover - typer releases that depend on click
    from click import exceptions as click_exc  # type: ignore[no-redef]
from llamba_cli.cli import ray_options
from llamba_cli.cli.progress import LogProgress, RichProgress
from llamba_cli.errors import LlambaError
from llamba_cli.job.checks import dry_run, validate_job
from llamba_cli.job.execute import JobSummary, run_job
from llamba_cli.job.prompts import list_formats, load_format
from llamba_cli.job.spec import build_spec, load_job_file

app = typer.Typer(
    name="llamba",
    help="Batch jobs over local LLMs: generate and classify files of prompts with llama.cpp.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
err = Console(stderr=True, highlight=False)
out = Console(highlight=False)


def _opt(*names: str, help: str, **kw: Any) -> Any:
    return typer.Option(*names, help=help, **kw)


def _csv(value: str | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(v.strip() for v in value.split(",") if v.strip())


# name -> (annotation, option). One table for every command; None means "not given".
OPTIONS: dict[str, tuple[Any, Any]] = {
    "output": (str | None, _opt("-o", "--output", help="Output file: .parquet or .jsonl.")),
    "model": (
        str | None,
        _opt(
            "-m",
            "--model",
            help="GGUF model path (default: $LLAMBA_MODEL, else the embedded Gemma 3 270M).",
            rich_help_panel="Model",
        ),
    ),
    "id_column": (
        str | None,
        _opt(
            "--id-column",
            help="Column holding row ids (default: 'id' if present, else the row number).",
            rich_help_panel="Prompt",
        ),
    ),
    "prompt_column": (
        str | None,
        _opt(
            "--prompt-column",
            help="Column with prompt text (default: prompt).",
            rich_help_panel="Prompt",
        ),
    ),
    "messages_column": (
        str | None,
        _opt(
            "--messages-column",
            help="Column with a chat messages list (default: messages).",
            rich_help_panel="Prompt",
        ),
    ),
    "template": (
        str | None,
        _opt(
            "--template",
            help="Build the prompt from columns: 'Review: {text}\\nSentiment:'.",
            rich_help_panel="Prompt",
        ),
    ),
    "system": (
        str | None,
        _opt(
            "--system",
            help="System message (a leading paragraph for plain prompts).",
            rich_help_panel="Prompt",
        ),
    ),
    "format": (
        str | None,
        _opt(
            "--format",
            help="Prompt format: auto (the model's chat template, else plain), gguf, plain, "
            "chatml, llama3, gemma, mistral, or a .toml path.",
            rich_help_panel="Prompt",
        ),
    ),
    "keep_columns": (
        str | None,
        _opt(
            "--keep-columns",
            help="Input columns to copy into the output, comma-separated.",
            rich_help_panel="Prompt",
        ),
    ),
    "temperature": (
        float | None,
        _opt(
            "--temperature", "--temp", help="0 = greedy (default 0.8).", rich_help_panel="Sampling"
        ),
    ),
    "top_k": (
        int | None,
        _opt("--top-k", help="Default 40; 0 = off.", rich_help_panel="Sampling"),
    ),
    "top_p": (
        float | None,
        _opt("--top-p", help="Default 0.95; 1 = off.", rich_help_panel="Sampling"),
    ),
    "min_p": (
        float | None,
        _opt("--min-p", help="Default 0.05; 0 = off.", rich_help_panel="Sampling"),
    ),
    "repeat_penalty": (
        float | None,
        _opt("--repeat-penalty", help="Default 1.0 = off.", rich_help_panel="Sampling"),
    ),
    "presence_penalty": (
        float | None,
        _opt("--presence-penalty", help="Default 0.", rich_help_panel="Sampling"),
    ),
    "frequency_penalty": (
        float | None,
        _opt("--frequency-penalty", help="Default 0.", rich_help_panel="Sampling"),
    ),
    "max_tokens": (
        int | None,
        _opt(
            "--max-tokens",
            help="Most tokens generated per row (default 256).",
            rich_help_panel="Sampling",
        ),
    ),
    "stop": (
        list[str] | None,
        _opt(
            "--stop",
            help="Stop string (repeatable); excluded from the output.",
            rich_help_panel="Sampling",
        ),
    ),
    "seed": (
        int | None,
        _opt(
            "--seed",
            help="Base seed (default 0); each row draws from its own stream.",
            rich_help_panel="Sampling",
        ),
    ),
    "n": (
        int | None,
        _opt("--n", help="Samples per prompt (generate).", rich_help_panel="Sampling"),
    ),
    "json_schema": (
        str | None,
        _opt(
            "--json-schema",
            help="JSON Schema file: every row is valid JSON of that shape.",
            rich_help_panel="Sampling",
        ),
    ),
    "grammar": (
        str | None,
        _opt(
            "--grammar",
            help="GBNF grammar file constraining the output.",
            rich_help_panel="Sampling",
        ),
    ),
    "labels": (
        str | None,
        _opt("--labels", help="Comma-separated labels (classify).", rich_help_panel="Classify"),
    ),
    "labels_file": (
        str | None,
        _opt(
            "--labels-file",
            help="File with one label per line (classify).",
            rich_help_panel="Classify",
        ),
    ),
    "label_delimiter": (
        str | None,
        _opt(
            "--label-delimiter",
            help="Joins prompt and label unless the prompt ends in whitespace (default: a space).",
            rich_help_panel="Classify",
        ),
    ),
    "slots": (
        int | None,
        _opt(
            "--slots",
            "-np",
            help="Sequences decoded together (default 16).",
            rich_help_panel="Engine",
        ),
    ),
    "ctx": (
        int | None,
        _opt(
            "--ctx",
            "-c",
            help="Most tokens per sequence, prompt + completion (default 2048).",
            rich_help_panel="Engine",
        ),
    ),
    "n_batch": (
        int | None,
        _opt(
            "--n-batch",
            "-b",
            help="Most tokens per llama_decode (default 512).",
            rich_help_panel="Engine",
        ),
    ),
    "threads": (
        int | None,
        _opt("--threads", "-t", help="CPU threads (default: all cores).", rich_help_panel="Engine"),
    ),
    "flash_attn": (
        str | None,
        _opt(
            "--flash-attn", "-fa", help="auto, on or off (default auto).", rich_help_panel="Engine"
        ),
    ),
    "n_gpu_layers": (
        int | None,
        _opt(
            "--n-gpu-layers",
            "-ngl",
            help="Layers offloaded to the GPU (default -1 = all, in a GPU build).",
            rich_help_panel="Engine",
        ),
    ),
    "prefix_cache": (
        bool | None,
        _opt(
            "--prefix-cache/--no-prefix-cache",
            help="Compute shared prompt prefixes once (default on).",
            rich_help_panel="Engine",
        ),
    ),
    "limit": (
        int | None,
        _opt("--limit", help="Process at most this many rows in this run.", rich_help_panel="Run"),
    ),
    "shard": (
        str | None,
        _opt(
            "--shard", help="I/N: only rows whose id hashes to shard I of N.", rich_help_panel="Run"
        ),
    ),
    "overwrite": (
        bool,
        _opt(
            "--overwrite",
            help="Replace existing output instead of resuming.",
            rich_help_panel="Run",
        ),
    ),
    "retry_errors": (
        bool,
        _opt(
            "--retry-errors",
            help="On resume, run rows that ended in error again.",
            rich_help_panel="Run",
        ),
    ),
    "max_errors": (
        int | None,
        _opt(
            "--max-errors",
            help="Tolerate this many error rows (exit 0); abort once exceeded.",
            rich_help_panel="Run",
        ),
    ),
    "flush_rows": (
        int | None,
        _opt(
            "--flush-rows",
            help="Make output durable every N rows (default 256).",
            rich_help_panel="Run",
        ),
    ),
    "flush_seconds": (
        float | None,
        _opt(
            "--flush-seconds",
            help="...and at least every S seconds (default 10).",
            rich_help_panel="Run",
        ),
    ),
    "metrics_json": (
        str | None,
        _opt(
            "--metrics-json",
            help="Write a machine-readable run summary here.",
            rich_help_panel="Run",
        ),
    ),
    "dry_run": (
        bool,
        _opt(
            "--dry-run",
            help="Render prompts and token counts; generate nothing.",
            rich_help_panel="Run",
        ),
    ),
}
OPTIONS.update(ray_options.OPTIONS)  # --ray, --address, --actors, ...
_GENERATE_ONLY = {
    "n",
    "json_schema",
    "grammar",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repeat_penalty",
    "presence_penalty",
    "frequency_penalty",
    "max_tokens",
    "stop",
}
_CLASSIFY_ONLY = {"labels", "labels_file", "label_delimiter"}


def _command(name: str, first: inspect.Parameter, skip: set[str], help: str) -> None:
    """Register a command whose signature is `first` plus the shared OPTIONS."""

    def impl(**kwargs: Any) -> None:
        _execute(name, kwargs)

    params = [first]
    for key, (annotation, option) in OPTIONS.items():
        if key in skip:
            continue
        default = False if annotation is bool else None
        params.append(
            inspect.Parameter(
                key,
                inspect.Parameter.KEYWORD_ONLY,
                default=default,
                annotation=Annotated[annotation, option],
            )
        )
    impl.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    impl.__doc__ = help
    app.command(name)(impl)


_INPUT = inspect.Parameter(
    "input",
    inspect.Parameter.POSITIONAL_OR_KEYWORD,
    annotation=Annotated[
        str, typer.Argument(help="Input file: .jsonl, .parquet or .csv.", show_default=False)
    ],
)
_JOB = inspect.Parameter(
    "job",
    inspect.Parameter.POSITIONAL_OR_KEYWORD,
    annotation=Annotated[
        str, typer.Argument(help="Job file (TOML), e.g. jobs/generate.toml.", show_default=False)
    ],
)

_command(
    "generate",
    _INPUT,
    _CLASSIFY_ONLY,
    "Generate a completion for every row (one output row per input row and sample).",
)
_command(
    "classify",
    _INPUT,
    _GENERATE_ONLY,
    "Classify every row: restrict the answer to --labels and report each label's probability.",
)
_command("run", _JOB, set(), "Run a job file; flags override its settings.")
_command(
    "validate",
    _JOB,
    {"dry_run", *ray_options.OPTIONS},
    "Check a job without generating: files, columns, labels, prompt token counts.",
)


@app.command("formats")
def formats_command() -> None:
    """List the packaged prompt formats."""
    for name in list_formats():
        fmt = load_format(name)
        out.print(f"[bold]{name:10}[/bold] {fmt.description}")


@app.command("version")
def version_command() -> None:
    """Print llamba's version."""
    out.print(f"llamba {__version__}")


def _execute(command: str, kwargs: dict[str, Any]) -> None:
    cluster = ray_options.take(kwargs)
    dry = kwargs.pop("dry_run", False)
    values: dict[str, Any] = {}
    if command in ("run", "validate"):
        values.update(load_job_file(kwargs.pop("job")))
    else:
        values["task"] = command
        values["input"] = kwargs.pop("input")
    for key in ("labels", "keep_columns"):
        if kwargs.get(key) is not None:
            kwargs[key] = _csv(kwargs[key])
    if kwargs.get("stop") == []:
        kwargs["stop"] = None
    for key, value in kwargs.items():
        if value is None or (OPTIONS[key][0] is bool and value is False):
            continue
        values[key] = tuple(value) if isinstance(value, list) else value
    spec = build_spec(values)
    if command == "validate":
        report = validate_job(spec)
        for line in report.lines():
            out.print(line)
        raise typer.Exit(report.exit_code)
    if dry:
        table = Table("id", "tokens", "prompt", show_lines=True)
        for row_id, n_tokens, prompt in dry_run(spec):
            table.add_row(row_id, str(n_tokens), prompt)
        out.print(table)
        return
    summary = _run_with_progress(spec, ray_options.runner(cluster))
    _print_summary(summary)
    raise typer.Exit(summary.exit_code)


def _run_with_progress(spec: Any, run: ray_options.Runner = run_job) -> JobSummary:
    quiet = os.environ.get("LLAMBA_PROGRESS") == "off"
    if err.is_terminal and not quiet:
        bar = RichProgress(err)
        try:
            return run(spec, bar)
        finally:
            bar.stop()
    interval = float(os.environ.get("LLAMBA_PROGRESS_INTERVAL", "10"))
    return run(spec, LogProgress(interval=interval if not quiet else float("inf")))


def _print_summary(s: JobSummary) -> None:
    parts = [
        f"{s.rows_written} rows written to {s.output}",
        f"{s.errors} errors",
        f"{s.generated_tokens} tokens generated at {s.tokens_per_second:.1f} tok/s",
        f"prompt tokens {s.prompt_tokens} (evaluated {s.prompt_tokens_evaluated}, "
        f"reused {s.prompt_tokens_reused})",
        f"{s.wall_seconds:.1f}s",
    ]
    if s.skipped_done:
        parts.insert(1, f"{s.skipped_done} already done")
    err.print("llamba: " + "; ".join(parts), soft_wrap=True)
    if s.duplicates:
        err.print(
            f"llamba: {s.duplicates} input rows repeat an earlier id and were not written "
            f"(e.g. {', '.join(repr(i) for i in s.duplicate_examples)})"
        )
    if s.aborted:
        err.print(f"llamba: aborted: {s.aborted}; rerun the same command to resume")


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the app and turns every known failure into one line."""
    try:
        # Without standalone mode, click returns an Exit's code instead of exiting.
        code = app(args=argv, standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        _fail("interrupted", 130)
    except click_exc.UsageError as e:
        hint = f" (see: {e.ctx.command_path} --help)" if e.ctx else ""
        _fail(f"{e.format_message()}{hint}", 2)
    except click_exc.ClickException as e:
        _fail(e.format_message(), 2)
    except LlambaError as e:
        _fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted; what was written is kept: rerun the same command to resume", 130)
    except Exception as e:
        if os.environ.get("LLAMBA_DEBUG"):
            raise
        _fail(f"internal error: {type(e).__name__}: {e} (set LLAMBA_DEBUG=1 for a traceback)", 70)


def _fail(message: str, code: int) -> None:
    print(f"llamba: error: {message}", file=sys.stderr)
    sys.exit(code)
