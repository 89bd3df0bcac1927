"""The `llamba` command line.

The job commands (`generate`, `classify`, `batch`, `run`, `validate`) take the same
options, less those that do not apply to their task (a batch file's lines carry their
own prompts and sampling); they differ in where the job comes from.  Every `LlambaError` is
turned into one line on stderr and its exit code here, in `main()`, and nowhere
else.  Exit codes: 0 all rows succeeded; 1 some rows ended in error (or the run
aborted at --max-errors); 2 usage, configuration, input, model or output error;
3 llama.cpp failed; 130 interrupted (SIGINT, SIGHUP); 143 terminated (SIGTERM).
User text (ids, paths, prompts) is always printed as plain text, never as markup.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
import threading
from typing import TYPE_CHECKING, Annotated, Any

import typer

try:  # recent typer vendors its own copy of click
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover - typer releases that depend on click
    from click import exceptions as click_exc  # type: ignore[no-redef]
from llamba_cli.cli import listing, preload, serve
from llamba_cli.cli.options import OPTIONS, take_ray
from llamba_cli.errors import ConfigError, LlambaError
from llamba_cli.job.interrupt import Interrupted, signals_raise
from llamba_cli.job.models import LOAD_THREAD
from llamba_cli.job.spec import BATCH_REFUSED, JobSpec, build_spec, load_job_file

# Start-up time: parsing options and printing help must not pay for numpy, pyarrow,
# jinja2 or llama.cpp, so what runs a job (job.execute, job.checks, the progress
# display) is imported inside the commands (tests/cli/test_startup.py checks it).
if TYPE_CHECKING:
    from rich.console import Console

    from llamba_cli.job.execute import JobOpener
    from llamba_cli.job.models import ModelLoad
    from llamba_cli.job.ray_data.options import RayOptions
    from llamba_cli.job.summary import JobSummary, ProgressSink

app = typer.Typer(
    name="llamba",
    help="Batch jobs over local LLMs: generate and classify files of prompts with llama.cpp.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


# Variables that make rich treat a stream as a terminal (or not) whatever isatty() says.
_TERMINAL_HINTS = ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "JUPYTER_COLUMNS")


def _plain_stderr() -> bool:
    """Whether stderr is surely not a terminal (a pipe or file: cron, CI, a test), as
    rich would also decide.  Then a job's progress and summary are plain lines and rich
    is not imported: on a one-row job its import would run beside the model's load."""
    if any(os.environ.get(v) is not None for v in _TERMINAL_HINTS):
        return False  # rich's own overrides: let rich decide
    try:
        return not sys.stderr.isatty()
    except (AttributeError, ValueError):  # a closed or stand-in stream
        return False


def _say(text: str, *, soft_wrap: bool = False) -> None:
    """One line of the command's own on stderr, plain text (user text is never markup)."""
    if _plain_stderr():
        print(text, file=sys.stderr, flush=True)
    else:
        _console(True).print(text, soft_wrap=soft_wrap)


@functools.cache
def _console(stderr: bool) -> Console:
    """The console for stdout or stderr, made on first use (rich loads only then).

    markup=False: whatever is printed may contain user text, and "[/x]" in an id or
    a path must print as itself, not be taken for a closing tag."""
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, markup=False)


# A batch file's lines carry their prompt and sampling, and custom_id is their id.
_NOT_BATCH = {*BATCH_REFUSED, "id_column"}
# Nor does a batch file run on Ray: its rows and output are OpenAI's, not a job's.
_NOT_BATCH_SECTIONS = ("sampling", "ray")

_DRY_RUN = typer.Option(
    "--dry-run", help="Render prompts and token counts; generate nothing.", rich_help_panel="Run"
)


def _command(name: str, first: inspect.Parameter, task: str | None, help: str) -> None:
    """Register a command whose signature is `first` plus the options for `task`
    (None: every option, for commands that read a job file)."""

    def impl(**kwargs: Any) -> None:
        _execute(name, kwargs)

    params = [first]
    for key, option in OPTIONS.items():
        if (
            (task == "classify" and option.generate_only)
            or (task == "generate" and option.classify_only)
            or (task == "batch" and (option.section in _NOT_BATCH_SECTIONS or key in _NOT_BATCH))
            or (name == "validate" and option.section == "ray")
        ):
            continue
        params.append(
            inspect.Parameter(
                key,
                inspect.Parameter.KEYWORD_ONLY,
                default=False if option.flag else None,
                annotation=Annotated[option.annotation, option.info],
            )
        )
    if name != "validate":
        params.append(
            inspect.Parameter(
                "dry_run",
                inspect.Parameter.KEYWORD_ONLY,
                default=False,
                annotation=Annotated[bool, _DRY_RUN],
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
    "generate",
    "Generate a completion for every row (one output row per input row and sample).",
)
_command(
    "classify",
    _INPUT,
    "classify",
    "Classify every row: restrict the answer to --labels and report each label's probability.",
)
_command(
    "batch",
    inspect.Parameter(
        "input",
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        annotation=Annotated[
            str,
            typer.Argument(
                help="OpenAI Batch file (.jsonl): one request a line.", show_default=False
            ),
        ],
    ),
    "batch",
    "Run an OpenAI Batch file (chat, completion and classify requests); OpenAI's output lines.",
)
_command("run", _JOB, None, "Run a job file; flags override its settings.")
_command(
    "validate",
    _JOB,
    None,
    "Check a job without generating: files, columns, labels, prompt token counts.",
)

serve.register(app, {key: (option.annotation, option.info) for key, option in OPTIONS.items()})


@app.command("formats")
def formats_command() -> None:
    """List the packaged prompt formats."""
    listing.print_formats()


@app.command("version")
def version_command() -> None:
    """Print llamba's version."""
    listing.print_version()


def _execute(command: str, kwargs: dict[str, Any]) -> None:
    cluster = take_ray(kwargs)
    dry = kwargs.pop("dry_run", False)
    values: dict[str, Any] = {}
    if command in ("run", "validate"):
        values.update(load_job_file(kwargs.pop("job")))
    else:
        values["task"] = command
        values["input"] = kwargs.pop("input")
    for key, given in kwargs.items():
        value = OPTIONS[key].value(given)
        if value is not None:
            values[key] = value
    spec = build_spec(values)
    if command == "validate":
        from llamba_cli.job.checks import validate_job

        report = validate_job(spec, opener=_opener(spec), model=_take_model(spec))
        for line in report.lines():
            _console(False).print(line)
        raise typer.Exit(report.exit_code)
    if dry:
        from rich.table import Table
        from rich.text import Text

        from llamba_cli.job.checks import dry_run

        table = Table("id", "tokens", "prompt", show_lines=True)
        notes: list[str] = []
        rows = dry_run(spec, opener=_opener(spec), notes=notes, model=_take_model(spec))
        for row_id, n_tokens, prompt in rows:
            table.add_row(Text(row_id), str(n_tokens), Text(prompt))
        _console(False).print(table)
        for note in notes:
            _console(False).print(note)
        return
    model = _take_model(spec) if cluster is None else None
    summary = _run_with_progress(spec, cluster, model)
    _print_summary(summary)
    raise typer.Exit(summary.exit_code)


def _take_model(spec: JobSpec) -> ModelLoad:
    """The spec's model, loading while the job's own imports and input checks run
    (started from the raw arguments when the guess was right)."""
    engine = spec.engine
    return preload.take(spec.model, n_gpu_layers=engine.n_gpu_layers, repack=engine.repack)


def _opener(spec: JobSpec) -> JobOpener:
    """The job class for the spec's task: a batch file's lines are OpenAI requests,
    run through the OpenAI protocol layer (loaded only then)."""
    if spec.task == "batch":
        from llamba_cli.openai.batch import BatchJob

        return BatchJob
    from llamba_cli.job.execute import Job

    return Job


def _run_with_progress(
    spec: JobSpec, cluster: RayOptions | None = None, model: ModelLoad | None = None
) -> JobSummary:
    from llamba_cli.cli.progress import LogProgress, RichProgress

    quiet = os.environ.get("LLAMBA_PROGRESS") == "off"
    if not quiet and not _plain_stderr() and _console(True).is_terminal:
        bar = RichProgress(_console(True))
        try:
            return _run(spec, bar, cluster, model)
        finally:
            bar.stop()
    interval = _progress_interval()
    progress = LogProgress(interval=interval if not quiet else float("inf"))
    return _run(spec, progress, cluster, model)


def _run(
    spec: JobSpec, progress: ProgressSink, cluster: RayOptions | None, model: ModelLoad | None
) -> JobSummary:
    """Run locally (taking `model`, already loading), or on Ray with `cluster` (Ray
    itself is imported only then)."""
    if cluster is None:
        from llamba_cli.job.execute import run_job

        return run_job(spec, progress, opener=_opener(spec), model=model)
    from llamba_cli.job.ray_data.runner import run_ray_job

    return run_ray_job(spec, cluster, progress)


def _progress_interval() -> float:
    raw = os.environ.get("LLAMBA_PROGRESS_INTERVAL", "10")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise ConfigError(f"LLAMBA_PROGRESS_INTERVAL must be a number of seconds > 0, got {raw!r}")
    return seconds


def _print_summary(s: JobSummary) -> None:
    speed = (
        f"{s.rows_per_second:.2f} rows/s"
        if s.task == "classify"
        else f"{s.generated_tokens} tokens generated at {s.tokens_per_second:.1f} tok/s"
    )
    parts = [
        f"{s.rows_written} rows written to {s.output}",
        f"{s.errors} errors",
        speed,
        f"prompt tokens {s.prompt_tokens} (evaluated {s.prompt_tokens_evaluated}, "
        f"reused {s.prompt_tokens_reused})",
        f"{s.wall_seconds:.1f}s",
    ]
    if s.skipped_done:
        parts.insert(1, f"{s.skipped_done} already done")
    _say("llamba: " + "; ".join(parts), soft_wrap=True)
    if s.duplicates:
        _say(
            f"llamba: {s.duplicates} input rows repeat an earlier id and were not written "
            f"(e.g. {', '.join(repr(i) for i in s.duplicate_examples)})"
        )
    if s.aborted:
        _say(f"llamba: aborted: {s.aborted}", soft_wrap=True)


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the app and turns every known failure into one line."""
    try:
        # Without standalone mode, click returns an Exit's code instead of exiting.
        with signals_raise():
            code = app(args=argv, standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except Interrupted as e:
        kept = e.kept or "what was written is kept: rerun the same command to resume"
        print(f"llamba: interrupted by {e.name}; {kept}", file=sys.stderr)
        sys.exit(e.exit_code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        _fail("interrupted; what was written is kept: rerun the same command to resume", 130)
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


def entry() -> None:
    """`main`, then leave without the interpreter's teardown (the installed command,
    through `launch.entry`, which starts loading the model first).

    Everything a run writes is closed (and synced) before `main` returns; what is left
    is freeing the model and context (about a tenth of a second for the embedded
    model) and module clean-up, which the operating system does faster.  Only when
    nothing else is running: no other thread (a model load nobody
    will take aside), no Ray runtime to shut down."""
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else None
        # A model still loading for a job that failed early holds nothing to flush.
        others = [t for t in threading.enumerate() if t.name != LOAD_THREAD]
        if code is None or len(others) > 1 or "ray" in sys.modules:
            raise
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def _fail(message: str, code: int) -> None:
    print(f"llamba: error: {message}", file=sys.stderr)
    sys.exit(code)
