"""Start-up time: how long a one-row job and `--help` take, end to end, as processes.

Cron and CI run llamba on many small files, so the fixed cost of a run matters as
much as throughput.  Every contender is a fresh process timed from spawn to exit
(wall clock), on the same model, prompt, thread count and token budget:

- llamba: `--help`, `formats`, and one-row `generate`, `classify` and
  `generate --json-schema` jobs (JSON Lines in, JSON Lines out);
- llama.cpp's own tools: `llama-simple` (load, one prompt, exit; it has no thread
  option, so it runs twice: at its default of 4 threads, and with its OpenMP threads
  capped to the others' count), `llama-cli` (single turn, `-st`) and `llama-cli --help`;
- llama-cpp-python: `python -c` that imports `llama_cpp`, builds `Llama` and runs one
  completion;
- servers, timed from spawn until their health check answers 200 (model loaded, ready
  for requests), then stopped: `llamba serve`, llama.cpp's `llama-server` and
  llama-cpp-python's server (`/v1/models`: it loads the model before it listens).

Rounds are interleaved (A B C ... A B C ...) and the report gives the median and
min-max per contender.  Run it on an otherwise idle machine:

    python benchmarks/bench_startup.py                    # -> results/startup.md
    python benchmarks/bench_startup.py --repeats 2 --out /tmp/s.md   # a quick check
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

PROMPT = "Write a haiku about the first snow of winter."
REVIEW = "Battery lasts all week and the screen is bright even outdoors."
SCHEMA = (
    '{"type": "object", "properties": {"title": {"type": "string", "maxLength": 24}, '
    '"rating": {"type": "integer", "minimum": 1, "maximum": 5}}, '
    '"required": ["title", "rating"]}'
)


@dataclass
class Contender:
    name: str
    argv: list[str]
    what: str
    env: dict[str, str] = field(default_factory=dict)
    times: list[float] = field(default_factory=list)
    error: str | None = None
    # A server: argv holds "{port}", and the time is spawn until GET ready_path is 200.
    ready_path: str | None = None
    # `python -m llamba_cli` imports from the working directory first: a checkout's own.
    cwd: Path | None = None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="GGUF file (default: the embedded Gemma 3 270M)")
    p.add_argument("--tokens", type=int, default=16, help="tokens to generate (default 16)")
    p.add_argument("--ctx", type=int, default=2048, help="context per sequence (default 2048)")
    p.add_argument("--threads", type=int, default=common.default_threads())
    p.add_argument("--repeats", type=int, default=7, help="rounds (default 7)")
    p.add_argument("--tools-bin", help="folder with llama-simple and llama-cli")
    p.add_argument(
        "--contenders",
        default="all",
        help="comma-separated subset of contender names (default: all)",
    )
    p.add_argument(
        "--baseline",
        type=Path,
        help="another llamba checkout (a previous release): its llamba rows run too, "
        "interleaved with this tree's, marked [baseline]",
    )
    p.add_argument(
        "--baseline-deps",
        type=Path,
        help="a folder of packages (pip install --target) put before the baseline's own "
        "environment, for a previous release whose dependencies differ",
    )
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR / "startup.md")
    return p.parse_args(argv)


def contenders(args: argparse.Namespace, model: Path, work: Path) -> list[Contender]:
    py = sys.executable
    (work / "one.jsonl").write_text(f'{{"id": "a", "prompt": "{PROMPT}"}}\n')
    (work / "review.jsonl").write_text(f'{{"id": "a", "text": "{REVIEW}"}}\n')
    (work / "schema.json").write_text(SCHEMA)
    llamba = [py, "-m", "llamba_cli"]
    common_opts = [
        "-m", str(model), "--threads", str(args.threads), "--ctx", str(args.ctx),
        "--flash-attn", "on", "--overwrite",
    ]  # fmt: skip
    gen = ["--temperature", "0", "--max-tokens", str(args.tokens)]
    env = {"LLAMBA_PROGRESS": "off", "PYTHONPATH": str(common.REPO_ROOT)}
    out = [
        Contender("llamba --help", [*llamba, "--help"], "prints the command list", env),
        Contender("llamba formats", [*llamba, "formats"], "lists the prompt formats", env),
        Contender(
            "llamba generate (1 row)",
            [
                *llamba,
                "generate",
                str(work / "one.jsonl"),
                "-o",
                str(work / "g.jsonl"),
                *common_opts,
                *gen,
            ],
            f"one row, {args.tokens} tokens, greedy",
            env,
        ),
        Contender(
            "llamba classify (1 row)",
            [
                *llamba,
                "classify",
                str(work / "review.jsonl"),
                "-o",
                str(work / "c.jsonl"),
                "--labels",
                "positive,negative",
                "--template",
                "Review: {text}\nSentiment:",
                *common_opts,
            ],
            "one row, two labels",
            env,
        ),
        Contender(
            "llamba generate --json-schema (1 row)",
            [
                *llamba,
                "generate",
                str(work / "one.jsonl"),
                "-o",
                str(work / "j.jsonl"),
                "--json-schema",
                str(work / "schema.json"),
                *common_opts,
                "--temperature",
                "0",
                "--max-tokens",
                str(max(args.tokens, 32)),
            ],
            "one row under a JSON Schema, greedy",
            env,
        ),
    ]
    tools = common.find_tools(args.tools_bin)
    if tools.bin_dir is not None:
        simple, cli = tools.path("llama-simple"), tools.path("llama-cli")
        out += [
            Contender(
                "llama-simple",
                [str(simple), "-m", str(model), "-n", str(args.tokens), PROMPT],
                f"load, {args.tokens} tokens greedy, exit (its defaults otherwise: 4 threads)",
            ),
            # llama-simple has no thread option; an OpenMP build honours the limit, so
            # this is llama.cpp's own C path at the thread count the others get.
            Contender(
                f"llama-simple ({args.threads} threads)",
                [str(simple), "-m", str(model), "-n", str(args.tokens), PROMPT],
                f"the same, its OpenMP threads capped (OMP_THREAD_LIMIT={args.threads})",
                {"OMP_THREAD_LIMIT": str(args.threads)},
            ),
            Contender(
                "llama-cli -st",
                [
                    str(cli),
                    "-m",
                    str(model),
                    "-p",
                    PROMPT,
                    "-n",
                    str(args.tokens),
                    "-st",
                    "-t",
                    str(args.threads),
                    "-c",
                    str(args.ctx),
                    "-fa",
                    "on",
                    "--temp",
                    "0",
                    "--no-display-prompt",
                    "--log-disable",
                ],
                f"single turn, {args.tokens} tokens (its defaults otherwise, warm-up on)",
            ),
            Contender("llama-cli --help", [str(cli), "--help"], "prints its options"),
        ]
        for c in out[-4:]:
            if not os.access(c.argv[0], os.X_OK):
                c.error = f"{Path(c.argv[0]).name} not built in {tools.bin_dir}"
    else:
        out.append(Contender("llama-simple", [], "", error=tools.note))
    code = (
        "import sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "import reference\n"
        "llm = reference.load_llama(sys.argv[2], n_ctx=int(sys.argv[3]),"
        " n_threads=int(sys.argv[4]), flash_attn=True, verbose=False)\n"
        "llm(sys.argv[5], max_tokens=int(sys.argv[6]), temperature=0.0)\n"
    )
    out.append(
        Contender(
            "llama-cpp-python Llama",
            [
                py,
                "-c",
                code,
                str(common.BENCH_DIR),
                str(model),
                str(args.ctx),
                str(args.threads),
                PROMPT,
                str(args.tokens),
            ],
            f"import, Llama(...), one completion of {args.tokens} tokens",
        )
    )
    out += servers(args, model, tools, env)
    if args.contenders != "all":
        wanted = {w.strip() for w in args.contenders.split(",")}
        out = [c for c in out if c.name in wanted]
    if args.baseline is not None:
        out = with_baseline(out, args.baseline, args.baseline_deps)
    return out


def with_baseline(cs: list[Contender], checkout: Path, deps: Path | None) -> list[Contender]:
    """Each llamba contender followed by the same command run from `checkout` (with
    the packages in `deps` first, when given)."""
    out = []
    for c in cs:
        out.append(c)
        if c.env.get("PYTHONPATH") == str(common.REPO_ROOT):
            c.cwd = common.REPO_ROOT
            path = [str(checkout.resolve())] + ([str(deps.resolve())] if deps else [])
            env = {**c.env, "PYTHONPATH": os.pathsep.join(path)}
            out.append(
                Contender(
                    f"{c.name} [baseline]",
                    c.argv,
                    c.what,
                    env,
                    ready_path=c.ready_path,
                    cwd=checkout.resolve(),
                )
            )
    return out


def baseline_fact(checkout: Path, deps: Path | None) -> str:
    try:
        commit = subprocess.run(
            ["git", "-C", str(checkout), "log", "-1", "--format=%h %s"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        commit = "not a git checkout"
    fact = f"- [baseline]: the same llamba commands from {checkout} ({commit})"
    if deps is not None:
        found = sorted(p.name.removesuffix(".dist-info") for p in deps.glob("*.dist-info"))
        fact += f", with {', '.join(found) or deps} before the environment's packages"
    return fact


def servers(
    args: argparse.Namespace, model: Path, tools: common.Tools, env: dict[str, str]
) -> list[Contender]:
    threads, ctx = str(args.threads), str(args.ctx)
    out = [
        Contender(
            "llamba serve: /health 200",
            [
                sys.executable, "-m", "llamba_cli", "serve", "-m", str(model),
                "--host", "127.0.0.1", "--port", "{port}", "--slots", "4", "--ctx", ctx,
                "--threads", threads, "--flash-attn", "on",
            ],
            "spawn until the model is loaded and the server ready, 4 slots",
            env,
            ready_path="/health",
        ),
    ]  # fmt: skip
    if tools.bin_dir is not None:
        server = tools.path("llama-server")
        out.append(
            Contender(
                "llama-server: /health 200",
                [
                    str(server), "-m", str(model), "--host", "127.0.0.1", "--port", "{port}",
                    "-np", "4", "-c", str(4 * args.ctx), "-t", threads, "-fa", "on",
                    *([] if common.repack_supported() else ["--no-repack"]), "--no-webui",
                ],
                "spawn until the model is loaded and the server ready, 4 slots",
                ready_path="/health",
            )
        )  # fmt: skip
        if not os.access(server, os.X_OK):
            out[-1].error = f"llama-server not built in {tools.bin_dir}"
    # As in bench_serve.py: llama.cpp's extra buffer types off where llamba turns them off.
    code = (
        "import runpy, sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "import reference\n"
        "sys.argv = ['llama_cpp.server', *sys.argv[2:]]\n"
        "with reference.extra_bufts_disabled():\n"
        "    runpy.run_module('llama_cpp.server', run_name='__main__')\n"
    )
    out.append(
        Contender(
            "llama-cpp-python server: /v1/models 200",
            [
                sys.executable, "-c", code, str(common.BENCH_DIR), "--model", str(model),
                "--host", "127.0.0.1", "--port", "{port}", "--n_ctx", ctx,
                "--n_threads", threads, "--flash_attn", "true",
            ],
            "spawn until it answers (it loads the model before it listens)",
            ready_path="/v1/models",
        )
    )  # fmt: skip
    return out


def time_ready(c: Contender) -> float:
    """Spawn the server, poll its ready path every 5 ms until 200, stop it."""
    assert c.ready_path is not None
    port = common.free_port()
    argv = [a.replace("{port}", str(port)) for a in c.argv]
    url = f"http://127.0.0.1:{port}{c.ready_path}"
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        argv,
        env={**os.environ, **c.env},
        cwd=c.cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while time.perf_counter() - t0 < 300:
            if proc.poll() is not None:
                raise RuntimeError(f"exited {proc.returncode} before it was ready")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        return time.perf_counter() - t0
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # not listening yet, or 503 while loading
            time.sleep(0.005)
        raise RuntimeError("not ready after 300 s")
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def time_once(c: Contender) -> float:
    if c.ready_path is not None:
        return time_ready(c)
    t0 = time.perf_counter()
    done = subprocess.run(
        c.argv,
        env={**os.environ, **c.env},
        cwd=c.cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=600,
        check=False,
    )
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        tail = done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:]
        raise RuntimeError(f"exit {done.returncode}: {' '.join(tail)}")
    return wall


def run(cs: list[Contender], repeats: int, each: Callable[[Contender], float]) -> None:
    live = [c for c in cs if not c.error]
    for c in live:  # one untimed run each: page cache and pycache warm for everyone
        try:
            each(c)
        except Exception as e:
            c.error = f"{type(e).__name__}: {e}"
            print(f"  {c.name}: FAILED ({c.error})", file=sys.stderr)
    for r in range(repeats):
        for c in live:
            if c.error:
                continue
            try:
                c.times.append(each(c))
            except Exception as e:
                c.error = f"{type(e).__name__}: {e}"
                continue
            print(f"  round {r + 1}/{repeats}  {c.name}: {c.times[-1]:.3f}s", file=sys.stderr)


def report(args: argparse.Namespace, cs: list[Contender], facts: list[str]) -> str:
    rows = []
    for c in cs:
        if c.error or not c.times:
            rows.append([c.name, "-", "-", c.what, c.error or "not run"])
            continue
        median = statistics.median(c.times)
        rows.append([c.name, f"{median:.3f}", f"{min(c.times):.3f}-{max(c.times):.3f}", c.what, ""])
    header = ["contender", "median s", "min-max s", "what runs", "note"]
    return "\n".join(
        [
            "# Start-up: one-row jobs, `--help` and servers, wall time per process",
            "",
            f"Command: `{common.command_line()}`",
            "",
            *facts,
            f"- rounds: {args.repeats} interleaved, after one untimed run each; "
            f"context {args.ctx} tokens",
            "",
            common.markdown_table(header, rows),
            "",
            "Each time is one whole process, from spawn to exit: interpreter start, imports,"
            " model load (memory-mapped, page cache warm), context, the job, output, exit;"
            " for a server, from spawn until its health check answers 200.",
            *paired(cs, f"llama-simple ({args.threads} threads)"),
        ]
    )


def paired(cs: list[Contender], floor_name: str) -> list[str]:
    """Per-round ratios: each llamba job against its [baseline] run (the next process
    in the same round) and against `floor_name`, `llama-simple` at the same thread
    count: the same work in C++ (later in the same round).  A shared machine's speed
    drifts between minutes, and the medians of two contenders can fall in different
    spells; a ratio within a round mostly cancels the drift."""
    by_name = {c.name: c for c in cs if c.times and not c.error}
    floor = by_name.get(floor_name)
    rows = []
    for c in by_name.values():
        if not c.name.startswith("llamba") or "[baseline]" in c.name:
            continue
        base = by_name.get(f"{c.name} [baseline]")
        cells = [c.name]
        for other in (base, floor if "(1 row)" in c.name else None):
            if other is None or len(other.times) != len(c.times):
                cells.append("-")
                continue
            ratios = [a / b for a, b in zip(c.times, other.times, strict=True)]
            faster = sum(r < 1 for r in ratios)
            cells.append(
                f"{statistics.median(ratios):.3f} ({min(ratios):.2f}-{max(ratios):.2f};"
                f" faster in {faster}/{len(ratios)})"
            )
        if cells[1:] != ["-", "-"]:
            rows.append(cells)
    if not rows:
        return []
    header = ["contender", "÷ [baseline], per round", f"÷ {floor_name}, per round"]
    return [
        "",
        "## Paired, round by round",
        "",
        "Median of the per-round ratios (min-max; rounds where the contender was faster).",
        "",
        common.markdown_table(header, rows),
    ]


def compile_bytecode(checkout: Path = common.REPO_ROOT) -> str:
    """Compile llamba's modules as an install (or any first run) leaves them, so the
    rounds time a user's run rather than Python compiling llamba's sources each time:
    where PYTHONDONTWRITEBYTECODE is set, a run never writes them itself (the
    libraries it is compared with were compiled when pip installed them)."""
    import compileall

    ok = compileall.compile_dir(str(checkout / "llamba_cli"), quiet=1)
    setting = os.environ.get("PYTHONDONTWRITEBYTECODE") or "unset"
    state = "compiled beforehand" if ok else "compiling failed; timed from source"
    return f"- llamba's bytecode: {state} (PYTHONDONTWRITEBYTECODE: {setting})"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = common.resolve_model(args.model)
    facts = [*common.machine_facts(args.threads, model), compile_bytecode()]
    if args.baseline is not None:
        compile_bytecode(args.baseline)
        facts.append(baseline_fact(args.baseline, args.baseline_deps))
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        cs = contenders(args, model, Path(tmp))
        run(cs, args.repeats, time_once)
    common.write_report(report(args, cs, facts), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
