"""What does the thread-safe front cost?  `EngineLoop` against `Engine.run` on the same work.

One run, same model, engine settings and prompts; each contender runs in a process of
its own per round (rounds interleaved), timed after an untimed warm-up in that process:
1. `Engine.run` over every request (the batch path: the caller's thread steps).
2. `EngineLoop`, requests submitted from the main thread, each stream iterated there
   (the engine steps on the loop's thread; outputs cross threads per step).
3. `EngineLoop` consumed from asyncio: one task per request, `async for` over its
   stream (outputs cross into the event loop with `call_soon_threadsafe`).
4. Like 2, in a process whose main thread ran `Engine.run` first: what the front costs
   when two threads of one process have computed with llama.cpp.

Why a process each: llama.cpp's CPU backend (OpenMP builds, as llama-cpp-python's
Linux wheels are) keeps a worker team per thread that computes, and once a process
has more OpenMP threads than cores its workers stop spinning between graph launches
and sleep instead.  A process whose main thread warmed up and whose loop thread then
computes pays that on every decode (contender 4), which is not the front's cost.

Reports generated tokens/s (greedy, end-of-generation ignored, so every contender
generates exactly the same number of tokens), each front's ratio to `Engine.run`,
and the loop's CPU time while idle.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    PROMPTS,
    RESULTS_DIR,
    Series,
    busy_cores,
    busy_warning,
    command_line,
    default_threads,
    interleave,
    machine_facts,
    markdown_table,
    ratio,
    resolve_model,
    set_up,
    write_report,
)

Runner = Any


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=32, help="requests per round (default 32)")
    p.add_argument("--tokens", type=int, default=64, help="generated tokens per request")
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=default_threads())
    p.add_argument("--model", default=None)
    p.add_argument("--out", default=str(RESULTS_DIR / "front.md"))
    p.add_argument("--child", choices=sorted(CONTENDERS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rows < 1 or args.tokens < 1 or args.repeats < 1:
        p.error("--rows, --tokens and --repeats must be >= 1")
    return args


class Work:
    """The same engine settings and requests for every contender."""

    def __init__(self, args: argparse.Namespace, model: Any) -> None:
        from llamba_cli.engine import EngineConfig, SamplingParams

        self.model = model
        self.config = EngineConfig(
            model_path=str(model.path),
            slots=args.slots,
            n_ctx_seq=512,
            n_threads=args.threads,
            flash_attn="on",
        )
        self.params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
        self.prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.rows)]
        self.expected = args.rows * args.tokens

    def requests(self) -> list[Any]:
        from llamba_cli.engine import Request

        return [Request(id=i, prompt=p, params=self.params) for i, p in enumerate(self.prompts)]

    def engine(self) -> Any:
        from llamba_cli.engine import Engine

        return Engine(self.config, model=self.model)

    def timed(self, generate: Any) -> tuple[float, int]:
        reqs = self.requests()
        t0 = time.perf_counter()
        generate(reqs)
        elapsed = time.perf_counter() - t0
        n = sum(r.completion_tokens for r in reqs)
        if n != self.expected or any(r.error for r in reqs):
            raise RuntimeError(f"generated {n} tokens, expected {self.expected}")
        return n / elapsed, n


def engine_run(w: Work) -> float:
    engine = w.engine()
    try:
        return w.timed(lambda reqs: list(engine.run(reqs)))[0]
    finally:
        engine.close()


def loop_threads(w: Work) -> float:
    from llamba_cli.engine import EngineLoop

    loop = EngineLoop(w.engine(), max_waiting=len(w.prompts))
    loop.start()

    def generate(reqs: list[Any]) -> None:
        streams = [loop.submit(r) for r in reqs]
        for stream in streams:
            for _ in stream:
                pass

    try:
        return w.timed(generate)[0]
    finally:
        loop.close()


def loop_asyncio(w: Work) -> float:
    from llamba_cli.engine import EngineLoop

    loop = EngineLoop(w.engine(), max_waiting=len(w.prompts))
    loop.start()

    async def consume(req: Any) -> None:
        async for _ in loop.submit(req):
            pass

    async def all_of(reqs: list[Any]) -> None:
        await asyncio.gather(*(consume(r) for r in reqs))

    try:
        return w.timed(lambda reqs: asyncio.run(all_of(reqs)))[0]
    finally:
        loop.close()


# name: (label, timed round, warm-up on the caller's thread first)
CONTENDERS: dict[str, tuple[str, Any, bool]] = {
    "run": ("`Engine.run` (caller's thread)", engine_run, True),
    "loop": ("`EngineLoop`, streams iterated by a thread", loop_threads, False),
    "asyncio": ("`EngineLoop`, `async for` per request", loop_asyncio, False),
    "loop-after-run": (
        "`EngineLoop` after `Engine.run` in the same process (see notes)",
        loop_threads,
        True,
    ),
}


def child(args: argparse.Namespace) -> int:
    """One timed round of one contender, in this process; prints its rate."""
    from llamba_cli.engine import Model

    _, timed_round, warm_on_caller = CONTENDERS[args.child]
    model = Model(resolve_model(args.model))
    w = Work(args, model)
    warm = Work(argparse.Namespace(**{**vars(args), "rows": 2, "tokens": 4}), model)
    if warm_on_caller:
        engine_run(warm)
    if timed_round is not engine_run:
        timed_round(warm)  # the loop's own thread warms up too
    rate = timed_round(w)
    print("RESULT " + json.dumps({"rate": rate, "work": w.expected}), flush=True)
    model.close()
    return 0


def in_process(args: argparse.Namespace, name: str) -> Runner:
    """A runner that runs contender `name` once in a fresh process."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", name]
    for flag in ("rows", "tokens", "slots", "threads"):
        argv += [f"--{flag}", str(getattr(args, flag))]
    if args.model:
        argv += ["--model", args.model]

    def run() -> tuple[float, int]:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if done.returncode != 0 or line is None:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"exit {done.returncode}: {tail}")
        got = json.loads(line.removeprefix("RESULT "))
        return got["rate"], got["work"]

    return run


def idle_cpu(w: Work, seconds: float = 2.0) -> tuple[float, float]:
    """CPU seconds this process used while a started loop had nothing to do."""
    from llamba_cli.engine import EngineLoop

    loop = EngineLoop(w.engine())
    loop.start()
    try:
        loop.submit(w.requests()[0]).result()  # warm: the loop has run and gone idle
        time.sleep(0.1)
        cpu0, t0 = time.process_time(), time.perf_counter()
        time.sleep(seconds)
        return time.process_time() - cpu0, time.perf_counter() - t0
    finally:
        loop.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args)
    from llamba_cli.engine import Model

    model_path = resolve_model(args.model)
    busy = busy_cores()
    series: list[Series] = []
    runners: list[tuple[Series, Runner]] = []
    for name, (label, _, _) in CONTENDERS.items():
        set_up(label, lambda name=name: in_process(args, name), series, runners)
    interleave(runners, args.repeats)
    model = Model(model_path)
    w = Work(args, model)
    base = series[0].median
    rows = []
    for s in series:
        cost = f"{(1 - s.median / base) * 100:+.1f}%" if s is not series[0] and base > 0 else "-"
        rows.append([s.name, f"{s.median:,.1f}", s.spread(), ratio(s.median, base), cost])
    cpu, wall = idle_cpu(w)
    lines = [
        "# The thread-safe front: EngineLoop vs Engine.run",
        "",
        f"Command: `{command_line()}`",
        "",
        *machine_facts(args.threads, model_path),
        f"- workload: {args.rows} prompts x {args.tokens} tokens (end-of-generation ignored), "
        f"{args.slots} slots, prefix cache on, {args.repeats} interleaved rounds, medians",
        "- each contender runs in a fresh process per round, timed after a warm-up there",
    ]
    warning = busy_warning(args.threads, busy)
    if warning and f"- {warning}" not in lines:
        lines.append(f"- {warning}")
    lines += [
        "",
        markdown_table(["contender", "median tok/s", "min-max", "÷ Engine.run", "cost"], rows),
        "",
        "Cost: how much slower than `Engine.run` on the same work (negative: faster, "
        "i.e. within noise).",
        f"- idle loop: {cpu * 1000:.1f} ms of CPU in {wall:.1f} s "
        f"({cpu / wall * 100:.2f}% of one core)",
        "- the last row is not the front's cost but llama.cpp's OpenMP worker teams: one per "
        "thread that computes, and with more OpenMP threads than cores in a process they "
        "sleep between decodes instead of spinning. Let one thread per process compute "
        "(the server and the CLI do).",
    ]
    for s in series:
        if s.error:
            lines.append(f"- {s.name}: {s.error}")
    write_report("\n".join(lines) + "\n", Path(args.out))
    model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
