"""Structured output: constrained (JSON Schema) against unconstrained generation.

Same prompts, model, engine settings and sampling chain (seeded per row) for both
contenders; only the grammar differs:

1. unconstrained - llamba's engine, no grammar
2. constrained   - the same engine with every row under a JSON Schema (nested object,
                   enums, integer ranges, a string array), compiled once and cloned
                   per row, as `llamba generate --json-schema` runs it

A constrained row ends when its JSON closes, so the two would otherwise do different
work, and fewer rows left running late in a run lowers tokens/s for reasons that have
nothing to do with the grammar.  So an untimed constrained warm-up run records each
row's token count, and the unconstrained contender generates exactly that many tokens
per row (end-of-generation ignored): the same rows, the same tokens per row, the same
batch shapes.  Model loading is excluded; rounds are interleaved and medians reported.
Writes benchmarks/results/structured.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from common import Series

Runner = Callable[[], tuple[float, int]]

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 60},
        "category": {"enum": ["story", "science", "howto", "opinion", "other"]},
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
        "keywords": {
            "type": "array",
            "items": {"type": "string", "maxLength": 20},
            "maxItems": 5,
        },
        "details": {
            "type": "object",
            "properties": {
                "audience": {"enum": ["children", "adults", "everyone"]},
                "minutes": {"type": "integer", "minimum": 1, "maximum": 120},
            },
            "required": ["audience", "minutes"],
        },
    },
    "required": ["title", "category", "rating", "keywords", "details"],
}


def prompt_for(task: str) -> str:
    return (
        f"Task: {task}\n"
        "Describe the task as JSON with a title, a category, a rating from 1 to 5, "
        "up to five keywords, and details (audience, minutes needed).\nJSON: "
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="GGUF file (default: llamba's embedded Gemma 3 270M)")
    p.add_argument("--rows", type=int, default=32, help="number of prompts (default 32)")
    p.add_argument("--tokens", type=int, default=128, help="max tokens per row (default 128)")
    p.add_argument("--slots", type=int, default=32, help="parallel sequences (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per contender")
    p.add_argument("--threads", type=int, default=common.default_threads())
    p.add_argument("--ctx", type=int, default=512, help="context tokens per sequence")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature")
    p.add_argument("--seed", type=int, default=0, help="base seed (row i uses seed + i)")
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR / "structured.md")
    args = p.parse_args(argv)
    if not 1 <= args.rows <= len(common.PROMPTS):
        p.error(f"--rows must be between 1 and {len(common.PROMPTS)}")
    for name in ("tokens", "slots", "repeats", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    return args


class Bench:
    """Both contenders on one loaded model; a fresh engine context per round."""

    def __init__(self, args: argparse.Namespace, model: Any, model_path: Path) -> None:
        from llamba_cli.engine import EngineConfig, SamplingParams, schema_to_gbnf

        self.args = args
        self.model = model
        self.prompts = [prompt_for(t) for t in common.PROMPTS[: args.rows]]
        self.gbnf = schema_to_gbnf(json.dumps(SCHEMA))
        self.config = EngineConfig(
            model_path=str(model_path),
            slots=args.slots,
            n_ctx_seq=args.ctx,
            n_batch=512,
            n_threads=args.threads,
            flash_attn="on",
            prefix_cache=True,
        )
        self.params = [
            SamplingParams(temperature=args.temperature, max_tokens=args.tokens, seed=args.seed + i)
            for i in range(len(self.prompts))
        ]
        self.row_tokens: list[int] = []  # per row, from the warm-up constrained run
        self.last: dict[str, list[Any]] = {}
        self.stats: dict[str, Any] = {}
        # Per round: wall seconds not spent inside llama_decode (sampling, grammar,
        # scheduling).  Less noisy than tok/s on a shared machine, and it is where the
        # grammar's cost lands.
        self.host_seconds: dict[str, list[float]] = {}

    def _run(self, name: str, constrained: bool) -> tuple[float, int]:
        import dataclasses

        from llamba_cli.engine import Engine, Request

        def request(i: int, prompt: str) -> Request:
            params = self.params[i]
            if constrained:
                return Request(id=i, prompt=prompt, params=params, grammar_text=self.gbnf)
            fixed = dataclasses.replace(
                params, max_tokens=max(1, self.row_tokens[i]), ignore_eos=True
            )
            return Request(id=i, prompt=prompt, params=fixed)

        with contextlib.closing(Engine(self.config, model=self.model)) as engine:
            reqs = [request(i, p) for i, p in enumerate(self.prompts)]
            t0 = time.perf_counter()
            done = sorted(engine.run(reqs), key=lambda r: r.id)
            elapsed = time.perf_counter() - t0
            self.stats[name] = engine.stats
            host = elapsed - engine.stats.decode_seconds
            self.host_seconds.setdefault(name, []).append(host)
        self.last[name] = done
        n = sum(r.completion_tokens for r in done)
        return n / elapsed, n

    def warm_up(self) -> None:
        """Untimed: one constrained run fixes every row's token count."""
        self._run("warm-up", constrained=True)
        self.row_tokens = [r.completion_tokens for r in self.last["warm-up"]]

    def runner(self, name: str, constrained: bool) -> Runner:
        return lambda: self._run(name, constrained)


def check_rows(done: list[Any]) -> tuple[int, int, int]:
    """(rows whose JSON parsed, rows ended with an error, rows not valid JSON but no error)."""
    parsed = errors = broken = 0
    for r in done:
        if r.error is not None:
            errors += 1
            continue
        try:
            json.loads(r.text)
            parsed += 1
        except ValueError:
            broken += 1
    return parsed, errors, broken


def constrained_tokens(series: list[Series]) -> int:
    rounds = [s.work for s in series if s.name == "constrained" and s.work]
    return int(statistics.median(rounds[0])) if rounds else 0


def build_report(
    args: argparse.Namespace, facts: list[str], bench: Bench, series: list[Series]
) -> str:
    free = series[0]
    base = free.median
    rows = []
    for s in series:
        if s.error or not s.rates:
            rows.append([s.name, "-", "-", "-", "-"])
            continue
        work = "/".join(sorted({f"{n:,}" for n in s.work}))
        slower = (1 - s.median / base) * 100 if base > 0 else float("nan")
        overhead = "-" if s is free else f"{slower:+.1f}%"
        rows.append([s.name, f"{s.median:,.1f}", s.spread(), work, overhead])
    table = common.markdown_table(
        ["contender", "median tok/s", "min-max", "generated tokens", "overhead"], rows
    )
    lines = [
        "# Structured output: constrained vs unconstrained generation",
        "",
        f"Command: `{common.command_line()}`",
        "",
        *(line.replace("greedy decoding", f"temperature {args.temperature}") for line in facts),
        f"- workload: {len(bench.prompts)} prompts, up to {args.tokens} tokens each, "
        f"{args.slots} slots, {args.ctx} context tokens per sequence, "
        f"{args.repeats} interleaved round{'s' if args.repeats > 1 else ''}, medians reported",
        "- sampling: llama.cpp's default chain (top-k 40, top-p 0.95, min-p 0.05), "
        f"seed {args.seed} + row index, the same for both contenders",
        "- constrained: every row under the JSON Schema below, compiled once per engine; "
        "unconstrained: the same rows, each generating exactly as many tokens as its "
        "constrained warm-up run did (end-of-generation ignored), so both do the same work",
        "",
        table,
        "",
        "tok/s = generated tokens / wall time of the whole run (model load excluded; the "
        "grammar's compilation, once per engine, included).  overhead = how much lower the "
        "constrained tok/s is than the unconstrained one (target: at most 25%).",
    ]
    notes: list[str] = []
    host = {k: statistics.median(v) for k, v in bench.host_seconds.items()}
    n_constrained = constrained_tokens(series)
    if "unconstrained" in host and "constrained" in host and n_constrained:
        extra = (host["constrained"] - host["unconstrained"]) / n_constrained
        notes.append(
            f"- time outside llama_decode (median round): unconstrained "
            f"{host['unconstrained']:.2f}s, constrained {host['constrained']:.2f}s, so the "
            f"grammar costs {extra * 1e3:.2f} ms of host time per generated token"
        )
    done = bench.last.get("constrained")
    if done:
        parsed, errors, broken = check_rows(done)
        lengths = [r.completion_tokens for r in done]
        notes.append(
            f"- constrained rows (last round): {parsed} of {len(done)} parsed as JSON, "
            f"{errors} ended with an error (max tokens reached before the JSON closed), "
            f"{broken} invalid without an error; tokens per row: median "
            f"{statistics.median(lengths):.0f}, min {min(lengths)}, max {max(lengths)}"
        )
        sample = next((r.text for r in done if r.error is None), None)
        if sample:
            notes.append(f"- sample output: `{sample.strip()}`")
    notes += [f"- **{s.name} failed**: {s.error}" for s in series if s.error]
    for name in ("unconstrained", "constrained"):
        st = bench.stats.get(name)
        if st is not None:
            notes.append(
                f"- {name} engine stats (last round): {st.generated_tokens:,} generated in "
                f"{st.steps:,} decode steps ({st.decode_seconds:.2f}s inside llama_decode)"
            )
    lines += ["", *notes]
    lines += ["", "Schema:", "", "```json", json.dumps(SCHEMA, indent=2), "```"]
    return "\n".join(lines).rstrip()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from llamba_cli.engine import Model

    model_path = common.resolve_model(args.model)
    facts = common.machine_facts(args.threads, model_path)  # before our own load
    model = Model(model_path)
    try:
        bench = Bench(args, model, model_path)
        print("warm-up (constrained, untimed) ...", file=sys.stderr)
        bench.warm_up()
        series: list[Series] = []
        runners: list[tuple[Series, Runner]] = []
        common.set_up(
            "unconstrained", lambda: bench.runner("unconstrained", False), series, runners
        )
        common.set_up("constrained", lambda: bench.runner("constrained", True), series, runners)
        common.interleave(runners, args.repeats)
        report = build_report(args, facts, bench, series)
    finally:
        model.close()
    common.write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
