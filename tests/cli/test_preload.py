"""The model load started from the raw arguments, before they are parsed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from llamba_cli.cli import preload
from llamba_cli.job.spec import build_spec


@pytest.fixture(autouse=True)
def no_guess_left() -> Iterator[None]:
    yield
    if preload._guess is not None:
        preload._guess.discard()
        preload._guess = None


def _take(**values: object) -> object:
    """What the job commands take for the spec these values make."""
    spec = build_spec({"task": "generate", "input": "in.jsonl", **values})
    engine = spec.engine
    return preload.take(spec.model, n_gpu_layers=engine.n_gpu_layers, repack=engine.repack)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--help"],
        ["formats"],
        ["serve", "--help"],
        ["validate", "--help"],
        ["generate", "--help"],
        ["generate", "in.jsonl", "--repack", "off"],
        ["generate", "in.jsonl", "-ngl", "0"],
        ["generate", "in.jsonl", "--ray-address", "auto"],
        ["run"],
        ["run", "/no/such/job.toml"],
    ],
)
def test_no_guess_where_nothing_loads_or_the_guess_is_unsure(argv: list[str]) -> None:
    preload.speculate(argv)
    assert preload._guess is None


def test_the_guess_is_taken_when_the_spec_wants_the_same_model(model_path: Path) -> None:
    preload.speculate(["generate", "in.jsonl", "-o", "out.jsonl"])
    guess = preload._guess
    assert guess is not None
    taken = _take()
    assert taken is guess and preload._guess is None
    assert taken.result()[0] == model_path
    taken.discard()


def test_a_wrong_guess_is_discarded_and_the_right_model_loads(model_path: Path) -> None:
    preload.speculate(["classify", "in.jsonl", "--model", "/no/such/model.gguf"])
    guess = preload._guess
    assert guess is not None
    taken = _take(repack=False)  # the spec says otherwise
    assert taken is not guess
    assert taken.settings == (None, -1, False)
    assert taken.result()[0] == model_path
    taken.discard()


@pytest.mark.parametrize(
    "argv",
    [["validate", "jobs/generate.toml"], ["generate", "in.jsonl", "--dry-run"]],
)
def test_validate_and_dry_run_guess_too(argv: list[str], model_path: Path) -> None:
    """They load the model as well (to tokenize, and to say what a run allocates)."""
    preload.speculate(argv)
    guess = preload._guess
    assert guess is not None
    taken = _take()
    assert taken is guess and taken.result()[0] == model_path
    taken.discard()


def test_no_guess_while_the_embedded_model_is_not_assembled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Assembling it is the run's own work (a long write that a signal must clean
    up), so the guess leaves it alone and writes nothing."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("LLAMBA_MODEL", raising=False)
    preload.speculate(["generate", "in.jsonl"])
    assert preload._guess is None
    assert list(tmp_path.iterdir()) == []


def test_serve_guesses_too(model_path: Path) -> None:
    preload.speculate(["serve", "--port", "0", "-m", str(model_path)])
    guess = preload._guess
    assert guess is not None
    assert preload.take(str(model_path)) is guess


def test_a_job_file_names_the_model(tmp_path: Path, model_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text(f'task = "generate"\ninput = "in.jsonl"\nmodel = "{model_path}"\n')
    preload.speculate(["run", str(job)])
    assert preload._guess is not None
    assert preload._guess.settings[0] == str(model_path)
    job.write_text('task = "generate"\ninput = "in.jsonl"\nrepack = "off"\n')
    preload._guess.discard()
    preload._guess = None
    preload.speculate(["run", str(job)])
    assert preload._guess is None  # load settings in the file: no guess


def test_a_wrong_guess_through_the_installed_entry_still_runs_the_right_model(
    tmp_path: Path, model_path: Path
) -> None:
    """`-mPATH` is a form the guess does not read: it loads the default model, the
    parsed options name another file, and the job runs on that one."""
    import json
    import subprocess
    import sys

    other = tmp_path / "other.gguf"
    other.symlink_to(model_path)
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "prompt": "One, two,"}\n')
    out = tmp_path / "out.jsonl"
    probe = (
        "import sys\n"
        "from llamba_cli.cli import preload\n"
        "from llamba_cli.cli.launch import entry\n"
        "sys.argv = ['llamba', *sys.argv[1:]]\n"
        "import llamba_cli.cli.app as app\n"
        "run = app.main\n"
        "def main():\n"
        "    guess = preload._guess\n"
        "    try:\n"
        "        run()\n"
        "    finally:\n"
        "        assert guess is not None and guess._discarded, 'the guess was not discarded'\n"
        "        assert preload._taken is None\n"
        "app.main = main\n"
        "entry()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, "generate", str(src), "-o", str(out), f"-m{other}",
         "--max-tokens", "2", "--temperature", "0"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a"] and rows[0]["error"] is None
