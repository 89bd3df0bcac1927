"""Batch-shape noise: how far llamba's results at many slots move from its results at
one slot, next to how far llama.cpp's own results move when one sequence is split
into decodes of other sizes. Speed is not measured.

llama.cpp picks kernels by batch shape, so the same prompt gives slightly different
logits alone, in a batch of 16, or evaluated in two pieces (a shared prefix, then
the tail). How much differs by CPU (AMX or not, weight repacking or not, x86 or
arm64); this report records it for the machine it ran on. The tests assert that
llamba's batch noise stays within `NOISE_FACTOR` (tests/conftest.py) times
llama.cpp's own, so the ratio column says how much room that leaves here.

1. Exactness: llamba at 1 slot (no prefix cache) against llama-cpp-python's `Llama`
   evaluating each prompt whole after `reset()` (benchmarks/reference.py): greedy
   tokens and label log-probabilities should be identical.
2. Generation (`--prompts` prompts x `--tokens` greedy tokens): at each of `--slots`,
   how many texts equal the 1-slot text, the mean first differing token, and the
   largest greedy gap (how far below the best token, by llama.cpp's own teacher-forced
   log-probabilities, a chosen token lies); against it, llama.cpp's own change of the
   two most likely tokens' log-probabilities between one decode and split decodes.
3. Classification (`--rows` few-shot reviews, labels positive/negative): max and p95
   |d logprob| at each of `--slots`, without and with the prefix cache, against
   llama.cpp's own change when each prompt is split (at the shared head, in halves,
   in chunks).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import reference
from reference import SHAPES, Reference

LABELS = ("positive", "negative")
GEN_HEADER = (
    "comparison",
    "texts equal",
    "mean first differing token",
    "max greedy gap (nats)",
    "÷ (2 x llama.cpp's noise)",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=16, help="generation prompts (default 16)")
    p.add_argument("--tokens", type=int, default=48, help="greedy tokens per prompt")
    p.add_argument("--rows", type=int, default=32, help="classification rows (default 32)")
    p.add_argument("--slots", default="8,16", help="slot counts to compare with 1 slot")
    p.add_argument("--ctx", type=int, default=512, help="context tokens per sequence")
    p.add_argument("--threads", type=int, default=common.default_threads())
    p.add_argument("--model", default=None)
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR / "noise.md")
    args = p.parse_args(argv)
    args.slots = [int(s) for s in args.slots.split(",") if s]
    if not 1 <= args.prompts <= len(common.PROMPTS):
        p.error(f"--prompts must be between 1 and {len(common.PROMPTS)}")
    if not 1 <= args.rows <= len(common.REVIEWS):
        p.error(f"--rows must be between 1 and {len(common.REVIEWS)}")
    if not args.slots or min(args.slots) < 1:
        p.error("--slots takes positive slot counts, e.g. 8,16")
    return args


class Llamba:
    """llamba engines on one loaded model, built like the tests' `make_engine`."""

    def __init__(self, args: argparse.Namespace, model_path: Path) -> None:
        from llamba_cli.engine import Model

        self.args = args
        self.model_path = model_path
        self.model = Model(model_path)

    def run(self, slots: int, prompts: Sequence[str], **kw: Any) -> list[Any]:
        from llamba_cli.engine import Engine, EngineConfig, Request, SamplingParams

        prefix_cache = kw.pop("prefix_cache", False)
        config = EngineConfig(
            model_path=str(self.model_path),
            slots=slots,
            n_ctx_seq=self.args.ctx,
            n_batch=512,
            n_threads=self.args.threads,
            flash_attn="on",
            prefix_cache=prefix_cache,
        )
        params = SamplingParams(temperature=0, max_tokens=self.args.tokens, ignore_eos=True)
        reqs = [Request(id=i, prompt=p, params=params, **kw) for i, p in enumerate(prompts)]
        with contextlib.closing(Engine(config, model=self.model)) as engine:
            done = sorted(engine.run(reqs), key=lambda r: r.id)
        errors = [r.error for r in done if r.error]
        if errors:
            raise RuntimeError(f"llamba rows failed: {errors[:3]}")
        return done


def first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))


def generation(
    args: argparse.Namespace, llamba: Llamba, ref: Reference
) -> tuple[list[list[str]], float]:
    """Table rows, and llama.cpp's own noise on the two most likely tokens."""
    prompts = list(common.PROMPTS[: args.prompts])
    ptoks = [ref.tokenize(p) for p in prompts]
    one = [r.generated() for r in llamba.run(1, prompts)]
    ref_tokens = [ref.greedy(t, args.tokens) for t in ptoks]
    exact = sum(a == b for a, b in zip(one, ref_tokens, strict=True))
    own = ref.top_noise([t for p, g in zip(ptoks, one, strict=True) for t in (p, p + g[:-1])])
    rows = [["1 slot vs `Llama`, whole prompts", f"{exact}/{len(prompts)}", "-", "-", "-"]]
    for slots in args.slots:
        many = [r.generated() for r in llamba.run(slots, prompts)]
        same = sum(a == b for a, b in zip(one, many, strict=True))
        first = np.mean([first_difference(a, b) for a, b in zip(one, many, strict=True)])
        gap = max(float(ref.greedy_gaps(p, g).max()) for p, g in zip(ptoks, many, strict=True))
        rows.append(
            [
                f"{slots} slots vs 1 slot",
                f"{same}/{len(prompts)}",
                f"{first:.1f}",
                f"{gap:.3f}",
                f"{gap / (2 * own):.2f}" if own > 0 else "-",
            ]
        )
    return rows, own


def classification(args: argparse.Namespace, llamba: Llamba, ref: Reference) -> list[list[str]]:
    prompts = [common.classify_prompt(review) for review, _ in common.REVIEWS[: args.rows]]
    toks = [ref.tokenize(p) for p in prompts]
    head = next(
        (i for i, col in enumerate(zip(*toks, strict=False)) if len(set(col)) > 1),
        min(len(t) for t in toks) // 2,
    )

    def scores(slots: int, **kw: Any) -> np.ndarray:
        return np.array([r.label_logprobs for r in llamba.run(slots, prompts, labels=LABELS, **kw)])

    whole = np.array([ref.label_logprobs(p, LABELS) for p in prompts])
    own = {
        str(shape): max(
            float(np.abs(np.array(ref.label_logprobs(p, LABELS, shape)) - w).max())
            for p, w in zip(prompts, whole, strict=True)
        )
        for shape in (*SHAPES, head)
    }
    worst = max(own.values())
    one = scores(1)
    rows = [["1 slot vs `Llama`, whole prompts", f"{np.abs(one - whole).max():.2e}", "-", "-"]]
    for slots in args.slots:
        for cache in (False, True):
            d = np.abs(scores(slots, prefix_cache=cache) - one)
            name = f"{slots} slots{', prefix cache' if cache else ''} vs 1 slot"
            ratio = f"{d.max() / worst:.2f}" if worst > 0 else "-"
            rows.append([name, f"{d.max():.3f}", f"{np.percentile(d, 95):.3f}", ratio])
    for shape, value in own.items():
        what = {"halves": "in halves", "1": "one token a decode", str(head): "head, then tail"}
        label = what.get(shape, f"chunks of {shape}")
        rows.append([f"llama.cpp alone: split {label} vs one decode", f"{value:.3f}", "-", "-"])
    return rows


def amx_flag() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return "yes" if "amx_tile" in f.read() else "no"
    except OSError:
        return "unknown (no /proc/cpuinfo)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model_path = common.resolve_model(args.model)
    llm = reference.load_llama(
        model_path,
        n_ctx=args.ctx,
        n_batch=512,
        n_ubatch=512,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        flash_attn=True,
        swa_full=True,
        verbose=False,
    )
    ref = Reference(llm)
    llamba = Llamba(args, model_path)
    print("generation ...", file=sys.stderr)
    gen, own = generation(args, llamba, ref)
    print("classification ...", file=sys.stderr)
    cls = classification(args, llamba, ref)
    lines = [
        "# Batch-shape noise",
        "",
        f"Command: `{common.command_line()}`",
        "",
        *common.machine_facts(args.threads, model_path),
        f"- AMX (`amx_tile` in /proc/cpuinfo): {amx_flag()}",
        f"- generation: {args.prompts} prompts x {args.tokens} greedy tokens (end of "
        f"generation ignored); classification: {args.rows} few-shot reviews, labels "
        f"{', '.join(LABELS)}; {args.ctx} context tokens per sequence, prefix cache off "
        "unless stated",
        "",
        "## Generation",
        "",
        common.markdown_table(GEN_HEADER, gen),
        "",
        f"llama.cpp's own noise: the two most likely tokens' log-probabilities after each "
        f"prompt and after its continuation move by up to **{own:.3f}** nats when the "
        f"sequence is split into decodes ({', '.join(map(str, SHAPES))}) instead of one.",
        "",
        "Greedy gap: how far below the best token (llama.cpp's own log-probabilities, "
        "teacher-forced one decode a token) the worst token a run chose lies. The tests "
        "allow 2 x NOISE_FACTOR x llama.cpp's own noise (the last column at most NOISE_FACTOR).",
        "",
        "## Classification (log P(label | prompt))",
        "",
        common.markdown_table(
            ["comparison", "max abs difference", "p95", "÷ llama.cpp's largest"], cls
        ),
        "",
        "The tests allow NOISE_FACTOR x llama.cpp's largest (the last column at most "
        "NOISE_FACTOR).",
    ]
    common.write_report("\n".join(lines), args.out)
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
