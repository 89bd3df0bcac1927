"""n samples from one long prompt: is the prompt computed once, and does decoding run
at the speed of pure decode?

One run, same model, threads and flash-attention setting, interleaved rounds:
1. llamba, `--n K` the way the job layer does it: K requests with the same prompt and
   their own seeds (temperature 0.8), the prefix cache sharing the prompt.
2. llamba with the prefix cache off: each sample evaluates the whole prompt.
3. llama-batched-bench `-pps` (prompt shared across the K sequences) at the same
   npp / ntg / npl: its S_TG is pure decode at batch K, the ceiling to compare with.

Reports generated tokens/s (whole run, prefix included, for llamba), the ratio to
batched-bench's S_TG, and llamba's prompt tokens evaluated vs reused.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_generate import parse_batched_bench
from common import (
    RESULTS_DIR,
    Series,
    busy_cores,
    busy_warning,
    classify_prompt,
    command_line,
    default_threads,
    find_tools,
    interleave,
    machine_facts,
    markdown_table,
    ratio,
    repack_supported,
    resolve_model,
    set_up,
    write_report,
)

Runner = Any


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=16, help="samples (default 16)")
    p.add_argument("--tokens", type=int, default=64, help="generated tokens per sample")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=default_threads())
    p.add_argument("--model", default=None)
    p.add_argument("--tools-bin", default=None)
    p.add_argument("--out", default=str(RESULTS_DIR / "samples.md"))
    return p.parse_args(argv)


def long_prompt() -> str:
    """A few hundred tokens: the long few-shot header with one review."""
    return classify_prompt("Arrived on time and works exactly as described.", long_prefix=True)


def llamba_runner(args: argparse.Namespace, model: Any, prefix_cache: bool, stats: list) -> Runner:
    from llamba_cli.engine import Engine, EngineConfig, Request, SamplingParams

    config = EngineConfig(
        model_path=str(model.path),
        slots=args.n,
        n_ctx_seq=1024,
        n_threads=args.threads,
        flash_attn="on",
        prefix_cache=prefix_cache,
    )
    prompt = long_prompt()

    def requests() -> list[Any]:
        return [
            Request(id=k, prompt=prompt, sample=k, params=SamplingParams(
                temperature=0.8, max_tokens=args.tokens, ignore_eos=True, seed=k))
            for k in range(args.n)
        ]  # fmt: skip

    with contextlib.closing(Engine(config, model=model)) as warm:
        list(warm.run(requests()[:1]))

    def run() -> tuple[float, int]:
        with contextlib.closing(Engine(config, model=model)) as engine:
            t0 = time.perf_counter()
            done = list(engine.run(requests()))
            elapsed = time.perf_counter() - t0
            stats.append(engine.stats)
        n = sum(r.completion_tokens for r in done)
        return n / elapsed, n

    return run


def batched_runner(args: argparse.Namespace, tools: Any, npp: int, model_path: Path) -> Runner:
    cmd = [
        str(tools.path("llama-batched-bench")), "-m", str(model_path),
        "-c", str(npp + args.n * args.tokens + 256), "-b", "512", "-ub", "512",
        "-npp", str(npp), "-ntg", str(args.tokens), "-npl", str(args.n), "-pps",
        "-fa", "on", "-t", str(args.threads), "-kvu", "--output-format", "jsonl",
        *([] if repack_supported() else ["--no-repack"]),
    ]  # fmt: skip

    def run() -> tuple[float, int]:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"exit {proc.returncode}: {proc.stderr[-1500:]}")
        res = parse_batched_bench(proc.stdout + "\n" + proc.stderr)
        return res["speed_tg"], int(res["pl"] * res["tg"])

    return run


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from llamba_cli.engine import Model

    model_path = resolve_model(args.model)
    busy = busy_cores()
    model = Model(model_path)
    npp = len(model.tokenize(long_prompt()))
    series: list[Series] = []
    runners: list[tuple[Series, Runner]] = []
    stats_on: list[Any] = []
    stats_off: list[Any] = []
    set_up(
        f"llamba --n {args.n} (prefix cache on)",
        lambda: llamba_runner(args, model, True, stats_on),
        series,
        runners,
    )
    set_up(
        f"llamba --n {args.n} (prefix cache off)",
        lambda: llamba_runner(args, model, False, stats_off),
        series,
        runners,
    )
    set_up(f"llama-batched-bench -pps S_TG (pure decode, batch {args.n})",
           lambda: batched_runner(args, find_tools(args.tools_bin), npp, model_path),
           series, runners)  # fmt: skip
    interleave(runners, args.repeats)
    ceiling = series[2].median
    rows = [[s.name, f"{s.median:,.1f}", s.spread(), ratio(s.median, ceiling)] for s in series]
    lines = [
        "# n samples from one long prompt",
        "",
        f"Command: `{command_line()}`",
        "",
        # This workload samples (temperature 0.8); the shared facts say "greedy".
        *[f.replace("; greedy decoding", "") for f in machine_facts(args.threads, model_path)],
        f"- workload: one prompt of {npp} tokens, {args.n} samples x {args.tokens} tokens "
        f"(temperature 0.8, own seed each), {args.repeats} interleaved rounds, medians",
    ]
    warning = busy_warning(args.threads, busy)
    if warning:
        lines.append(f"- {warning}")
    lines += [
        "",
        markdown_table(["contender", "median tok/s", "min-max", "÷ pure decode"], rows),
        "",
        "llamba's tok/s counts its whole run (prompt evaluation included); batched-bench's "
        "S_TG is decode only.",
    ]
    for label, stats in (("on", stats_on), ("off", stats_off)):
        if stats:
            st = stats[-1]
            lines.append(
                f"- prefix cache {label}: prompt tokens {st.prompt_tokens:,}, evaluated "
                f"{st.prompt_tokens_evaluated:,}, reused {st.prompt_tokens_reused:,}"
            )
    for s in series:
        if s.error:
            lines.append(f"- {s.name}: {s.error}")
    report = "\n".join(lines) + "\n"
    print(report)
    write_report(report, Path(args.out))
    model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
