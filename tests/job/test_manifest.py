"""The job fingerprint an output records, and what a rerun is refused."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import orjson
import pytest

from llamba_cli.errors import OutputError, ResumeError
from llamba_cli.job.manifest import check_fingerprint, normalized, preflight
from llamba_cli.job.store import OutputStore

FP = {"model": "gemma-270m", "temperature": 0.0, "task": "generate"}


def test_a_fingerprint_compares_as_it_reads_back_from_json(tmp_path: Path) -> None:
    given = {"stop": ("a", "b"), "n": np.int64(2), "prompt": tmp_path, 1: None}
    stored = orjson.loads(orjson.dumps(normalized(given)))
    assert stored == {"stop": ["a", "b"], "n": 2, "prompt": str(tmp_path), "1": None}
    check_fingerprint(tmp_path / "out.jsonl", stored, given)


def test_a_different_fingerprint_names_what_changed(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    stored = {"model": "other", "task": "generate", "gone": 1}
    with pytest.raises(ResumeError) as caught:
        check_fingerprint(out, stored, {**FP, "seed": 3})
    assert str(caught.value) == (
        f"'{out}' was produced by a different job (changed: model, temperature, seed, gone);"
        " rerun with --overwrite or choose another output path"
    )
    with pytest.raises(ResumeError, match=r"\(changed: fingerprint\)"):
        check_fingerprint(out, ["not", "a", "dict"], FP)
    with pytest.raises(ResumeError, match="was not produced by llamba"):
        check_fingerprint(out, None, FP)


def test_preflight_finds_what_open_would_refuse(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"id": 1}\n')
    with pytest.raises(ResumeError, match="not produced by llamba"):
        preflight(foreign, fingerprint=FP)
    preflight(foreign, fingerprint=FP, overwrite=True)
    with pytest.raises(OutputError, match="unknown output format"):
        preflight(tmp_path / "out.txt", fingerprint=FP)
    out = tmp_path / "out.jsonl"
    store = OutputStore(out, fingerprint=FP)
    store.write({"id": "1", "text": "one", "error": None})
    with pytest.raises(OutputError, match=rf"another llamba run \(pid {os.getpid()}\)"):
        preflight(out, fingerprint=FP)
    store.close()
    preflight(out, fingerprint=FP)  # unfinished work of the same job resumes
    with pytest.raises(ResumeError, match="different job"):
        preflight(out, fingerprint={**FP, "task": "classify"})
    OutputStore(out, fingerprint=FP).finalize()
    preflight(out, fingerprint=FP)  # and so does its finished output
    with pytest.raises(ResumeError, match=r"\(changed: task\)"):
        preflight(out, fingerprint={**FP, "task": "classify"})
