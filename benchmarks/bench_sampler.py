"""Sampler speed at the model's vocabulary size: milliseconds to sample one step of
`--rows` rows over a 262,144-token vocabulary, per sampling setting.

No model runs: the rows are LLM-like logits (a broad bulk and a few tokens far above
it). A decode step of the embedded model at 16-32 slots takes ~100-200 ms on a
2-core CPU, so a sampler that sorted the vocabulary (~25 ms a row) would cost more
than the decode; the candidate cut in `llamba_cli/engine/sampler.py` keeps a step to
a few milliseconds. Reports the best of `--repeats` runs (the least disturbed).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

VOCAB = 262_144


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=16, help="rows per step (default 16)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR / "sampler.md")
    return p.parse_args(argv)


def llm_like_logits(rows: int) -> np.ndarray:
    rng = np.random.default_rng(15)
    logits = (rng.standard_normal((rows, VOCAB)) * 2.5).astype(np.float32)
    for r in range(rows):
        logits[r, rng.choice(VOCAB, 5, replace=False)] += 15.0
    return logits


def best_ms(logits: np.ndarray, params: object, repeats: int) -> float:
    from llamba_cli.engine import Request
    from llamba_cli.engine.sampler import sample

    best = float("inf")
    for _ in range(repeats):
        reqs = [Request(id=i, prompt="", params=params) for i in range(len(logits))]  # type: ignore[arg-type]
        for i, r in enumerate(reqs):
            r.rng = np.random.default_rng(i)
        block = logits.copy()
        t0 = time.perf_counter()
        sample(block, list(range(len(logits))), reqs)
        best = min(best, time.perf_counter() - t0)
    return best * 1000


def main(argv: list[str] | None = None) -> int:
    from llamba_cli.engine import SamplingParams

    args = parse_args(argv)
    settings = {
        "defaults (T 0.8, top-k 40, top-p 0.95, min-p 0.05)": SamplingParams(),
        "greedy": SamplingParams(temperature=0.0),
        "min-p only (T 1.5, min-p 0.05)": SamplingParams(
            temperature=1.5, top_k=0, top_p=1.0, min_p=0.05
        ),
        "all cuts (T 0.7, top-k 20, top-p 0.9, min-p 0.1)": SamplingParams(
            temperature=0.7, top_k=20, top_p=0.9, min_p=0.1
        ),
        "plain temperature (T 1, no cuts)": SamplingParams(
            temperature=1.0, top_k=0, top_p=1.0, min_p=0.0
        ),
    }
    logits = llm_like_logits(args.rows)
    rows = []
    for name, params in settings.items():
        ms = best_ms(logits, params, args.repeats)
        rows.append([name, f"{ms:.1f}", f"{ms / args.rows:.2f}"])
        print(f"  {name}: {ms:.1f} ms", file=sys.stderr)
    lines = [
        "# Sampler speed",
        "",
        f"Command: `{common.command_line()}`",
        "",
        f"- CPU: {common.cpu_model()}, {common.default_threads()} logical cores",
        f"- {args.rows} rows x {VOCAB:,} tokens per step, best of {args.repeats}",
        "",
        common.markdown_table(["setting", "ms per step", "ms per row"], rows),
    ]
    common.write_report("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
