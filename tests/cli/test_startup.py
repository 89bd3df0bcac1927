"""Start-up: commands that only parse options or print help import nothing heavy.

A property, not a timing: `llamba --help` and `llamba formats` must not load numpy,
pyarrow, jinja2, llama.cpp or the server stack, which together cost several tenths
of a second before the first line is printed (cron and CI run llamba on many small
files).  Each case runs in a fresh interpreter, as the installed command does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = (
    "numpy",
    "pyarrow",
    "jinja2",
    "llama_cpp",
    "fastapi",
    "starlette",
    "uvicorn",
    "ray",
)
# Not pydantic: typer converts option values through it whenever a command runs.

_PROBE = """
import json, sys
sys.argv = ["llamba", *sys.argv[1:]]
from llamba_cli.cli.app import main
try:
    main()
except SystemExit:
    pass
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(json.loads(HEAVY)))
print("HEAVY=" + json.dumps(heavy))
"""


def heavy_modules_after(*args: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", f"HEAVY = {json.dumps(json.dumps(HEAVY))}\n{_PROBE}", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("HEAVY="))
    return json.loads(line.removeprefix("HEAVY="))


@pytest.mark.parametrize(
    "args",
    [
        ("--help",),
        ("formats",),
        ("version",),
        ("generate", "--help"),
        ("classify", "--help"),
        ("run", "--help"),
        ("serve", "--help"),
        ("batch", "--help"),
    ],
)
def test_help_and_formats_import_nothing_heavy(args: tuple[str, ...]) -> None:
    assert heavy_modules_after(*args) == []


def test_the_probe_sees_heavy_imports() -> None:
    """The check can fail: a command that runs a job does load them."""
    found = heavy_modules_after("validate", "jobs/generate.toml")
    assert {"numpy", "llama_cpp", "pyarrow"} <= set(found)


def test_engine_config_alone_does_not_load_llama_cpp() -> None:
    code = (
        "import sys\n"
        "from llamba_cli.engine import EngineConfig, SamplingParams\n"
        "EngineConfig(model_path='m.gguf'); SamplingParams()\n"
        "assert 'llama_cpp' not in sys.modules and 'numpy' not in sys.modules\n"
        "from llamba_cli.engine import Model\n"
        "assert 'llama_cpp.llama_cpp' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_engine_loads_only_llama_cpp_bindings_and_leaves_the_package_whole() -> None:
    """The engine imports llama-cpp-python's C bindings without its high-level package
    (start-up), and a later `import llama_cpp` still gets the whole package, sharing
    the same bindings module."""
    code = (
        "import sys\n"
        "from llamba_cli.engine import Model\n"
        "import llamba_cli.engine.llama as ffi\n"
        "assert 'llama_cpp.llama' not in sys.modules and 'jinja2' not in sys.modules\n"
        "import llama_cpp\n"
        "assert llama_cpp.Llama and llama_cpp.__version__\n"
        "assert llama_cpp.llama_cpp is ffi.lc and llama_cpp.llama_model_load_from_file\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_guessed_load_starts_before_the_heavy_imports(model_path: Path) -> None:
    """The model's load is most of a small job's wall time, so it starts before numpy,
    pyarrow and the parser are imported (they run beside it); and it loads.  (The
    fixture assembles the embedded model first: nothing loads early before that.)"""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from llamba_cli.cli import preload\n"
        "preload.speculate(['generate', 'in.jsonl', '-o', 'out.jsonl'])\n"
        "guess = preload._guess\n"
        "late = {'numpy', 'pyarrow', 'jinja2', 'typer', 'pydantic', 'rich'}\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & late)\n"
        "assert heavy == [], heavy\n"
        "path, model = guess.result()\n"
        f"assert model.n_vocab > 0 and path == Path({str(model_path)!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize(("given", "seen"), [(None, "1"), ("3", "3")])
def test_the_command_keeps_numpy_blas_to_one_thread_unless_told(
    given: str | None, seen: str
) -> None:
    """numpy's BLAS threads would spin beside the model's load; no llamba code uses
    them.  A user's own OPENBLAS_NUM_THREADS stands."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    if given is not None:
        env["OPENBLAS_NUM_THREADS"] = given
    probe = (
        "import os, sys\n"
        "sys.argv = ['llamba', 'version']\n"
        "from llamba_cli.cli.launch import entry\n"
        "entry()\n"
        "print('BLAS=' + os.environ['OPENBLAS_NUM_THREADS'])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == f"BLAS={seen}"


@pytest.mark.parametrize("command", ["formats", "version"])
def test_option_less_commands_answer_without_the_parser_and_say_the_same(command: str) -> None:
    """`llamba formats` / `version` skip Typer (start-up) and print what the Typer
    command prints."""
    from typer.testing import CliRunner

    from llamba_cli.cli.app import app

    probe = (
        "import sys\n"
        f"sys.argv = ['llamba', {command!r}]\n"
        "from llamba_cli.cli.launch import entry\n"
        "entry()\n"
        "assert 'typer' not in sys.modules and 'pydantic' not in sys.modules\n"
    )
    fast = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    parsed = CliRunner().invoke(app, [command])
    assert parsed.exit_code == 0
    assert fast.stdout == parsed.stdout and fast.stdout.strip()


def test_a_job_logging_to_a_pipe_does_not_load_rich(model_path: Path, tmp_path: Path) -> None:
    """Under cron or CI stderr is a pipe: progress and the summary are plain lines, so
    rich is not imported beside the model's load.  The summary stays one line, however
    long."""
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": "a", "prompt": "Hi"}\n')
    argv = ["llamba", "generate", str(source), "-o", str(tmp_path / "out.jsonl")]
    argv += ["-m", str(model_path), "--max-tokens", "2", "--temperature", "0"]
    probe = (
        "import sys\n"
        f"sys.argv = {argv!r}\n"
        "from llamba_cli.cli.app import main\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "print('LOADED=' + ','.join(sorted({m.split('.')[0] for m in sys.modules}"
        " & {'rich', 'numpy'})))\n"
    )
    hints = ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "JUPYTER_COLUMNS")
    env = {k: v for k, v in os.environ.items() if k not in hints}  # rich's terminal overrides
    done = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "LOADED=numpy"  # numpy: the probe sees imports
    summary = [ln for ln in done.stderr.splitlines() if "rows written to" in ln]
    assert len(summary) == 1 and summary[0].endswith("s") and "; 0 errors; " in summary[0]


_JOB_PROBE = """
import sys
argvs = {argvs!r}
from llamba_cli.cli.app import main
for argv in argvs:
    sys.argv = argv
    try:
        main()
    except SystemExit as e:
        assert e.code == 0, (argv, e.code)
loaded = {{m.split(".")[0] for m in sys.modules}} & {{"pyarrow", "numpy"}}
print("LOADED=" + ",".join(sorted(loaded)))
"""


@pytest.mark.parametrize(
    ("case", "loaded"),
    [
        ("generate.jsonl", "numpy"),
        ("classify.jsonl", "numpy"),
        ("schema.jsonl", "numpy"),
        ("csv.jsonl", "numpy"),
        ("generate.parquet", "numpy,pyarrow"),  # the probe sees Arrow where it is needed
    ],
)
def test_json_lines_jobs_never_load_arrow(
    model_path: Path, tmp_path: Path, case: str, loaded: str
) -> None:
    """Arrow's import is 0.1-0.2 s of work that slows the model's load beside it; a job
    that reads and writes JSON Lines (or reads CSV) has no use for it, run or resumed."""
    kind, suffix = case.split(".")
    if kind == "csv":
        source = tmp_path / "in.csv"
        source.write_text("id,prompt\na,Hi\nb,Yo\n")
    else:
        source = tmp_path / "in.jsonl"
        source.write_text('{"id": "a", "prompt": "Hi", "text": "fine"}\n')
    out = tmp_path / f"out.{suffix}"
    argv = ["llamba", "classify" if kind == "classify" else "generate", str(source)]
    argv += ["-o", str(out), "-m", str(model_path), "--ctx", "512"]
    if kind == "classify":
        argv += ["--labels", "yes,no"]
    else:
        argv += ["--max-tokens", "4", "--temperature", "0"]
    if kind == "schema":
        schema = tmp_path / "schema.json"
        schema.write_text('{"type": "boolean"}')  # complete within the 4 tokens
        argv += ["--json-schema", str(schema)]
    # The second run finds the first one's finished output and resumes it.
    probe = _JOB_PROBE.format(argvs=[argv, argv])
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == f"LOADED={loaded}"
    assert out.exists()
