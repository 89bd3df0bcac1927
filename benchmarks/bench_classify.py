"""Classification throughput and exactness: llamba's label scoring against the
per-label loop people write today.

Every row is a short product review after a shared few-shot header; each label's
score is log P(label tokens | prompt), summed over the label's tokens.  Contenders:

1. per-label loop       - llama-cpp-python's `Llama(logits_all=True)`: for each row
                          and label, evaluate `prompt + " " + label` from scratch and
                          sum the log-softmax of the label tokens
2. llamba, no prefix cache
3. llamba, prefix cache - the default: the shared header is evaluated once

Reports rows/s (medians of interleaved rounds), speed-ups over the loop, how far
llamba's probabilities are from the loop's, and llamba's prompt-token accounting.
Writes benchmarks/results/classify.md (classify-long.md with --long-prefix).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import reference
from common import Series

Runner = Callable[[], tuple[float, int]]
Scores = dict[int, list[float]]  # row index -> log P(label | prompt) per label
CONTENDERS = ("loop", "nocache", "cache")


@dataclass
class Workload:
    """What every contender is asked to do, and the machine facts taken before it."""

    model_path: Path
    facts: list[str]
    prompts: list[str]
    gold: list[str]
    labels: tuple[str, ...]
    slots: int
    threads: int
    ctx: int
    shared_prefix_tokens: int
    long_prefix: bool


@dataclass
class Outcome:
    """A contender's scores from its last round, and llamba's engine counters."""

    scores: Scores = field(default_factory=dict)
    stats: Any = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="GGUF file (default: llamba's embedded Gemma 3 270M)")
    p.add_argument("--rows", type=int, default=len(common.REVIEWS), help="reviews to classify")
    p.add_argument("--labels", default="positive,negative", help="comma-separated labels")
    p.add_argument("--slots", type=int, default=16, help="llamba's parallel sequences")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per contender")
    p.add_argument("--threads", type=int, default=common.default_threads())
    p.add_argument("--ctx", type=int, default=512, help="context tokens per sequence")
    p.add_argument(
        "--long-prefix",
        action="store_true",
        help="use the ~300-token few-shot header instead of the ~50-token one",
    )
    p.add_argument(
        "--contenders",
        default=",".join(CONTENDERS),
        help=f"comma-separated subset of {','.join(CONTENDERS)}",
    )
    p.add_argument("--out", type=Path, help="report file (default: benchmarks/results/...)")
    args = p.parse_args(argv)
    args.labels = tuple(s.strip() for s in args.labels.split(",") if s.strip())
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    if len(args.labels) < 2:
        p.error("--labels needs at least two labels")
    unknown = set(args.contenders) - set(CONTENDERS)
    if unknown:
        p.error(f"unknown contenders: {', '.join(sorted(unknown))}")
    if not 1 <= args.rows <= len(common.REVIEWS):
        p.error(f"--rows must be between 1 and {len(common.REVIEWS)} (rows are never repeated)")
    for name in ("slots", "repeats", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.out is None:
        name = "classify-long.md" if args.long_prefix else "classify.md"
        args.out = common.RESULTS_DIR / name
    return args


def label_delimiter(prompt: str, delimiter: str = " ") -> str:
    """llamba's rule: no delimiter after a prompt that already ends in whitespace."""
    return "" if not prompt or prompt[-1].isspace() else delimiter


# -- 1. per-label loop --------------------------------------------------------------


def log_softmax_at(row: np.ndarray, token: int) -> float:
    """log softmax(row)[token], normalizer in float64."""
    m = float(row.max())
    lse = m + float(np.log(np.exp(row - m, dtype=np.float64).sum()))
    return float(row[token]) - lse


def loop_label_logprobs(llm: Any, prompt: str, labels: tuple[str, ...]) -> list[float]:
    """log P(label | prompt) for each label, each evaluated from scratch with all logits."""
    ptoks = llm.tokenize(prompt.encode(), add_bos=True, special=True)
    delim = label_delimiter(prompt)
    out = []
    for label in labels:
        full = llm.tokenize((prompt + delim + label).encode(), add_bos=True, special=True)
        start = 0
        while start < min(len(ptoks), len(full) - 1) and ptoks[start] == full[start]:
            start += 1
        llm.reset()
        llm.eval(full)
        # Row j-1 of the logits predicts token j.
        out.append(sum(log_softmax_at(llm.scores[j - 1], full[j]) for j in range(start, len(full))))
    return out


def loop_contender(w: Workload, stack: contextlib.ExitStack, outcome: Outcome) -> Runner:
    """llama-cpp-python with `logits_all=True`, one evaluation per row and label."""
    llm = reference.load_llama(
        w.model_path,
        n_ctx=w.ctx,
        n_batch=512,
        n_threads=w.threads,
        n_threads_batch=w.threads,
        flash_attn=True,
        logits_all=True,
        verbose=False,
    )
    stack.callback(llm.close)
    loop_label_logprobs(llm, w.prompts[0], w.labels)  # warm-up, untimed

    def run() -> tuple[float, int]:
        t0 = time.perf_counter()
        scores = {i: loop_label_logprobs(llm, p, w.labels) for i, p in enumerate(w.prompts)}
        elapsed = time.perf_counter() - t0
        outcome.scores = scores
        return len(scores) / elapsed, len(scores)

    return run


# -- 2./3. llamba -------------------------------------------------------------------


def llamba_contender(w: Workload, model: Any, prefix_cache: bool, outcome: Outcome) -> Runner:
    """A fresh llamba Engine (context) per round on the shared, already loaded model,
    so no round reuses a prefix cached by the one before."""
    from llamba_cli.engine import Engine, EngineConfig, Request, SamplingParams

    config = EngineConfig(
        model_path=str(w.model_path),
        slots=w.slots,
        n_ctx_seq=w.ctx,
        n_batch=512,
        n_threads=w.threads,
        flash_attn="on",
        prefix_cache=prefix_cache,
    )
    params = SamplingParams(temperature=0, max_tokens=1)

    def classify(prompts: list[str], engine: Any) -> Scores:
        requests = (
            Request(id=i, prompt=p, params=params, labels=w.labels) for i, p in enumerate(prompts)
        )
        scores: Scores = {}
        for r in engine.run(requests):
            if r.error or r.label_logprobs is None:
                raise RuntimeError(f"row {r.id} failed: {r.error}")
            scores[r.id] = list(r.label_logprobs)
        return scores

    with contextlib.closing(Engine(config, model=model)) as warm:  # warm-up, untimed
        classify(w.prompts[:1], warm)

    def run() -> tuple[float, int]:
        with contextlib.closing(Engine(config, model=model)) as engine:
            t0 = time.perf_counter()
            scores = classify(w.prompts, engine)
            elapsed = time.perf_counter() - t0
            outcome.stats = engine.stats
        outcome.scores = scores
        return len(scores) / elapsed, len(scores)

    return run


# -- comparison and report ----------------------------------------------------------


def probabilities(scores: Scores) -> dict[int, np.ndarray]:
    """P(label) over the label set, per row."""
    from llamba_cli.engine import normalize

    return {i: np.asarray(normalize(lp)) for i, lp in scores.items()}


def agreement(reference: Scores, other: Scores) -> dict[str, float]:
    """Mean / max |P difference| over rows and labels, and argmax agreement in %."""
    ref, oth = probabilities(reference), probabilities(other)
    rows = sorted(set(ref) & set(oth))
    diffs = np.concatenate([np.abs(ref[i] - oth[i]) for i in rows])
    same = sum(int(np.argmax(ref[i]) == np.argmax(oth[i])) for i in rows)
    return {
        "mean_abs": float(diffs.mean()),
        "max_abs": float(diffs.max()),
        "argmax_pct": 100.0 * same / len(rows),
    }


def gold_accuracy(w: Workload, scores: Scores) -> float | None:
    """% of rows whose top label is the review's gold label (default labels only)."""
    if set(w.labels) != {"positive", "negative"} or not scores:
        return None
    hits = sum(int(w.labels[int(np.argmax(lp))] == w.gold[i]) for i, lp in scores.items())
    return 100.0 * hits / len(scores)


def speed_table(series: list[Series], loop: Series | None) -> str:
    base = loop.median if loop and loop.rates else float("nan")
    rows = [
        [s.name, f"{s.median:,.2f}", s.spread(2), str(s.work[0]), common.ratio(s.median, base)]
        for s in series
        if s.rates
    ]
    return common.markdown_table(
        ["contender", "median rows/s", "min-max", "rows", "speed-up vs per-label loop"], rows
    )


def exactness_table(
    w: Workload, loop: Outcome | None, llambas: list[tuple[str, Outcome]]
) -> str | None:
    """How llamba's P(label) compares with the per-label loop's, and its token counts."""
    rows = []
    for name, out in llambas:
        if not out.scores:
            continue
        row = [name]
        if loop and loop.scores:
            a = agreement(loop.scores, out.scores)
            row += [f"{a['mean_abs']:.2e}", f"{a['max_abs']:.2e}", f"{a['argmax_pct']:.1f}%"]
        else:
            row += ["-", "-", "-"]
        st = out.stats
        row += [f"{st.prompt_tokens_evaluated:,}", f"{st.prompt_tokens_reused:,}"]
        rows.append(row)
    if not rows:
        return None
    header = [
        "llamba mode",
        "mean abs ΔP",
        "max abs ΔP",
        "argmax agreement",
        "prompt tokens evaluated",
        "prompt tokens reused",
    ]
    return common.markdown_table(header, rows)


def build_report(
    args: argparse.Namespace,
    w: Workload,
    series: list[Series],
    loop: Outcome | None,
    llambas: list[tuple[str, Outcome]],
) -> str:
    loop_series = next((s for s in series if s.name.startswith("per-label loop")), None)
    title = "long" if w.long_prefix else "short"
    lines = [
        f"# Classification throughput ({title} shared prefix)",
        "",
        f"Command: `{common.command_line()}`",
        "",
        *w.facts,
        f"- workload: {len(w.prompts)} product reviews after a shared few-shot header of "
        f"{w.shared_prefix_tokens} tokens; labels {', '.join(w.labels)}; llamba slots "
        f"{w.slots}; {args.repeats} interleaved rounds, medians reported",
        "",
        speed_table(series, loop_series),
        "",
        "rows/s = rows / wall time of the whole run (model load excluded).",
    ]
    exact = exactness_table(w, loop, llambas)
    if exact:
        lines += [
            "",
            "Exactness against the per-label loop (P(label) normalized over the label set, "
            "last round), and llamba's prompt tokens in its last round:",
            "",
            exact,
        ]
    lines += ["", *(f"- {n}" for n in contender_notes(w, series, loop, llambas))]
    return "\n".join(lines).rstrip()


def contender_notes(
    w: Workload, series: list[Series], loop: Outcome | None, llambas: list[tuple[str, Outcome]]
) -> list[str]:
    notes = []
    if loop:
        notes.append(
            "per-label loop: llama-cpp-python `Llama(logits_all=True)`; per row and label, "
            '`llm.reset()`, `llm.eval(tokenize(prompt + " " + label))`, and the sum of the '
            "log-softmax of the label tokens read from `llm.scores`"
        )
        if llambas:
            notes.append(
                "ΔP is llama.cpp's batch-shape numerics, not a different quantity: the same "
                "tokens evaluated in a batch of another shape (prompt + label in one batch in "
                "the loop, prompt alone or beside other rows in llamba) give slightly "
                "different logits; argmax agreement is the practical check"
            )
    if llambas:
        notes.append(
            "llamba: `Request(prompt, labels=...)` through `Engine`; `label_logprobs` is the "
            "same sum, with every label's tokens scored after one evaluation of the prompt; "
            "a fresh engine context per round on the loaded model"
        )
    accuracies = [("per-label loop", loop)] if loop else []
    for name, out in [*accuracies, *llambas]:
        acc = gold_accuracy(w, out.scores) if out else None
        if acc is not None:
            notes.append(f"{name}: {acc:.1f}% of rows match the reviews' hand-written labels")
    notes += [f"**{s.name} failed**: {s.error}" for s in series if s.error]
    return notes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from llamba_cli.engine import Model

    model_path = common.resolve_model(args.model)
    facts = common.machine_facts(args.threads, model_path)  # before our own load
    model = Model(model_path)
    reviews = common.REVIEWS[: args.rows]
    prompts = [common.classify_prompt(r, long_prefix=args.long_prefix) for r, _ in reviews]
    header = common.CLASSIFY_HEADER_LONG if args.long_prefix else common.CLASSIFY_HEADER_SHORT
    w = Workload(
        model_path=model_path,
        facts=facts,
        prompts=prompts,
        gold=[g for _, g in reviews],
        labels=args.labels,
        slots=args.slots,
        threads=args.threads,
        ctx=args.ctx,
        shared_prefix_tokens=len(model.tokenize(header + "Review:")),
        long_prefix=args.long_prefix,
    )

    series: list[Series] = []
    runners: list[tuple[Series, Runner]] = []
    loop_out = Outcome() if "loop" in args.contenders else None
    llambas: list[tuple[str, Outcome]] = []
    with contextlib.ExitStack() as stack:
        stack.callback(model.close)

        def add(name: str, make: Callable[[], Runner]) -> None:
            common.set_up(name, make, series, runners)

        if loop_out is not None:
            add("per-label loop (llama-cpp-python)", lambda: loop_contender(w, stack, loop_out))
        for key, cache in (("nocache", False), ("cache", True)):
            if key in args.contenders:
                name = f"llamba, prefix cache {'on' if cache else 'off'}"
                out = Outcome()
                llambas.append((name, out))
                add(name, lambda c=cache, o=out: llamba_contender(w, model, c, o))
        common.interleave(runners, args.repeats)

    common.write_report(build_report(args, w, series, loop_out, llambas), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
