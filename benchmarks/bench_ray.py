"""Ray's overhead on one machine, and what it predicts for N machines.

The same generate job (--rows prompts, --tokens greedy tokens each, --slots slots)
runs three ways, each in a fresh process started cold, as a user's command is:

1. local     - llamba's local runner (`llamba generate`), one engine on --threads
2. ray x1    - `--ray`: a local Ray instance, 1 actor with --threads threads
3. ray x2    - `--ray`: 2 actors with --threads / 2 threads each

Every run reports its phases: Ray start-up (`ray.init`), preparing the job (checking
it, which loads the model once in the driver, then reading the input and handing
its blocks to Ray), the first finished block (actor start-up: Ray worker and model
load, plus one block), and the steady rate after it.  From these, the report
states a scaling model for N machines like this one: a fixed start-up cost plus the
rows divided over N machines' actors at the measured steady rate.  It is a model
from one machine's numbers, not a measurement of a cluster.

Writes benchmarks/results/ray.md.  Needs the `ray` extra.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

KINDS = ("local", "ray1", "ray2")
NAMES = {"local": "local", "ray1": "ray, 1 actor", "ray2": "ray, 2 actors"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="GGUF file (default: llamba's embedded Gemma 3 270M)")
    p.add_argument("--rows", type=int, default=256, help="rows in the job (default 256)")
    p.add_argument("--tokens", type=int, default=32, help="tokens generated per row")
    p.add_argument("--slots", type=int, default=8, help="sequences per engine (default 8)")
    p.add_argument("--block-rows", type=int, default=32, help="rows per Ray block")
    p.add_argument("--threads", type=int, default=common.default_threads())
    p.add_argument("--ctx", type=int, default=512, help="context tokens per sequence")
    p.add_argument("--repeats", type=int, default=2, help="timed rounds per contender")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"subset of {','.join(KINDS)}")
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR / "ray.md")
    p.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
    p.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if set(args.kinds) - set(KINDS):
        p.error(f"unknown kinds: {', '.join(sorted(set(args.kinds) - set(KINDS)))}")
    for name in ("rows", "tokens", "slots", "block_rows", "threads", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


# -- one run, in its own process ----------------------------------------------------


class Timeline:
    """A progress sink that notes when the job starts and when rows finish."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.started = 0.0
        self.done: list[tuple[float, int]] = []  # (seconds since t0, rows so far)
        self.rows = 0

    def start(self, total: int | None, unit: str) -> None:
        self.started = time.perf_counter() - self.t0

    def advance(self, rows: int, errors: int, tokens: int) -> None:
        self.rows += rows
        self.done.append((time.perf_counter() - self.t0, self.rows))

    def note(self, text: str) -> None:
        pass


def worker(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    from llamba_cli.job.execute import run_job
    from llamba_cli.job.spec import build_spec

    kind = args.worker
    values = {
        "task": "generate",
        "input": str(args.input),
        "output": str(args.output),
        "model": args.model,
        "temperature": 0.0,
        "max_tokens": args.tokens,
        "slots": args.slots,
        "ctx": args.ctx,
        "flash_attn": "on",
        "overwrite": True,
    }
    ray_start = 0.0
    timeline = Timeline()
    if kind == "local":
        imported = time.perf_counter() - t0
        spec = build_spec({**values, "threads": args.threads})
        timeline.t0 = time.perf_counter()
        summary = run_job(spec, timeline)
    else:
        from llamba_cli.job.ray_data.options import RayOptions
        from llamba_cli.job.ray_data.runner import connect, run_ray_job

        imported = time.perf_counter() - t0
        actors = 1 if kind == "ray1" else 2
        threads = max(1, args.threads // actors)
        t = time.perf_counter()
        ray = connect(None)
        ray_start = time.perf_counter() - t
        spec = build_spec(values)
        options = RayOptions(actors=actors, threads_per_actor=threads, block_rows=args.block_rows)
        timeline.t0 = time.perf_counter()
        summary = run_ray_job(spec, options, timeline)
        ray.shutdown()
    return {
        "kind": kind,
        "actors": {"local": 1, "ray1": 1, "ray2": 2}[kind],
        "import": imported,
        "ray_start": ray_start,
        "prepare": timeline.started,
        "done": timeline.done,
        "job": time.perf_counter() - timeline.t0,
        "rows": summary.rows_written,
        "tokens": summary.generated_tokens,
    }


def run_once(args: argparse.Namespace, kind: str, workdir: Path, n: int) -> dict[str, Any]:
    out = workdir / f"{kind}-{n}.parquet"
    cmd = [sys.executable, __file__, "--worker", kind, "--input", str(workdir / "in.jsonl")]
    cmd += ["--output", str(out), "--tokens", str(args.tokens), "--slots", str(args.slots)]
    cmd += ["--threads", str(args.threads), "--ctx", str(args.ctx)]
    cmd += ["--block-rows", str(args.block_rows)]
    if args.model:
        cmd += ["--model", args.model]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=common.REPO_ROOT)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{kind} exited {proc.returncode}: {' | '.join(tail)}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall"] = wall
    return result


# -- the phases of a run, and the model ---------------------------------------------


def phases(run: dict[str, Any]) -> dict[str, float]:
    """Seconds and rates of one run: start-up up to the first finished rows, and the
    steady rate after the start-up wave (every actor's first block, which carries its
    start-up, is left out: rows after it / time after it)."""
    done = run["done"]
    wave = min(run["actors"], len(done)) - 1
    first_t = done[0][0]
    wave_t, wave_rows = done[wave]
    last_t, last_rows = done[-1]
    steady = (last_rows - wave_rows) / (last_t - wave_t) if last_t > wave_t else float("nan")
    return {
        "wall": run["wall"],
        "ray_start": run["ray_start"],
        "prepare": run["prepare"],
        "first": first_t - run["prepare"],
        "steady": steady,
        "overall": run["rows"] / run["wall"],
        "fixed": run["wall"] - (last_t - wave_t),  # everything but the steady part
    }


def median_phases(runs: list[dict[str, Any]]) -> dict[str, float]:
    each = [phases(r) for r in runs]
    return {key: statistics.median(p[key] for p in each) for key in each[0]}


def report(args: argparse.Namespace, facts: list[str], results: dict[str, list]) -> str:
    med = {kind: median_phases(runs) for kind, runs in results.items() if runs}
    rows = []
    for kind, p in med.items():
        rows.append(
            [
                NAMES[kind],
                f"{p['wall']:.1f}",
                f"{p['ray_start']:.1f}" if kind != "local" else "-",
                f"{p['prepare']:.1f}",
                f"{p['first']:.1f}",
                f"{p['steady']:.2f}",
                f"{p['overall']:.2f}",
            ]
        )
    table = common.markdown_table(
        [
            "run",
            "wall s",
            "Ray start s",
            "prepare s",
            "to first rows s",
            "steady rows/s",
            "overall rows/s",
        ],
        rows,
    )
    lines = [
        "# llamba on Ray: one machine, and a model for N",
        "",
        f"`{common.command_line()}`",
        "",
        *facts,
        f"- job: generate, {args.rows} rows x {args.tokens} greedy tokens, --slots {args.slots},"
        f" Ray blocks of {args.block_rows} rows; {args.repeats} interleaved rounds, medians",
        "",
        table,
        "",
        "`wall`: the whole process, imports to exit. `prepare`: checking the job (the model"
        " is loaded once in the driver), reading the input and handing it to Ray (for local:"
        " checking the job and loading the model). `to first rows`: from then until the"
        " first rows are finished (local: the first row; Ray: the first block, which"
        " includes starting the actors and loading the model in each). `steady`: rows/s"
        " after that.",
    ]
    ray_kinds = [k for k in ("ray2", "ray1") if k in med]
    if ray_kinds and "local" in med:
        kind = ray_kinds[0]
        p, local = med[kind], med["local"]
        fixed, rate, actors = p["fixed"], p["steady"], 2 if kind == "ray2" else 1
        per_block = args.block_rows * (actors / rate - 1 / local["steady"])
        if per_block > 0:
            block_cost = (
                f" Ray's per-block cost here is about {per_block:.2f} s per {args.block_rows}-row"
                " block (a block's rows at one actor's Ray rate minus the local rate), which"
                " includes the engine draining at each block's end."
            )
        else:
            block_cost = " At this size Ray's per-block cost is below the noise."
        lines += [
            "",
            "## Scaling model",
            "",
            f"From the `{NAMES[kind]}` run: a job of R rows on N machines like this one"
            f" ({actors} actor(s) each) takes about",
            "",
            f"    wall(N, R) = F + R / (N x {rate:.2f} rows/s),  F = {fixed:.1f} s",
            "",
            f"F is everything but the steady part: Python and Ray start-up"
            f" ({p['ray_start']:.1f} s here), checking the job and handing the input to Ray"
            f" ({p['prepare']:.1f} s), and the first block with actor start-up"
            f" ({p['first']:.1f} s). The driver reads the input alone, so its share of F grows"
            " with R (not with N); actors start in parallel, so the rest stays put as N grows."
            f" Locally the same job runs at {local['steady']:.2f} rows/s after"
            f" {local['fixed']:.1f} s of start-up." + block_cost,
            "",
            "| N machines | predicted wall s | predicted rows/s | vs local |",
            "| ---: | ---: | ---: | ---: |",
        ]
        local_wall = local["fixed"] + args.rows / local["steady"]
        for n in (1, 2, 4, 8, 16):
            wall = fixed + args.rows / (n * rate)
            lines.append(
                f"| {n} | {wall:.1f} | {args.rows / wall:.2f} | {local_wall / wall:.2f}x |"
            )
        lines += [
            "",
            f"(For R = {args.rows} rows; local wall at the same rates: {local_wall:.1f} s.)"
            " A cluster pays off once R / rate outweighs F: larger jobs approach N x the"
            " steady rate; small ones are dominated by start-up.",
        ]
    errors = [f"- {NAMES[k]}: {e}" for k, e in results.get("errors", [])]
    if errors:
        lines += ["", "Failed runs:", *errors]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    try:
        import ray  # noqa: F401
    except ImportError:
        print("bench_ray needs the 'ray' extra: pip install 'llamba[ray]'", file=sys.stderr)
        return 2
    model_path = common.resolve_model(args.model)
    facts = common.machine_facts(args.threads, model_path)
    results: dict[str, list] = {kind: [] for kind in args.kinds}
    results["errors"] = []
    with tempfile.TemporaryDirectory(prefix="llamba-bench-ray-") as tmp:
        workdir = Path(tmp)
        prompts = [common.PROMPTS[i % len(common.PROMPTS)] for i in range(args.rows)]
        lines = [json.dumps({"id": f"b{i:05d}", "prompt": p}) for i, p in enumerate(prompts)]
        (workdir / "in.jsonl").write_text("\n".join(lines) + "\n")
        for r in range(args.repeats):
            for kind in args.kinds:
                try:
                    run = run_once(args, kind, workdir, r)
                except RuntimeError as e:
                    results["errors"].append((kind, str(e)))
                    print(f"  {kind}: FAILED ({e})", file=sys.stderr)
                    continue
                results[kind].append(run)
                print(
                    f"  round {r + 1}/{args.repeats}  {NAMES[kind]}: {run['wall']:.1f} s",
                    file=sys.stderr,
                )
    common.write_report(report(args, facts, results), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
