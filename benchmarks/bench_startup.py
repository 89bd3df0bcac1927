"""Start-up time: how long a one-row job and `--help` take, end to end, as processes.

Cron and CI run llamba on many small files, so the fixed cost of a run matters as
much as throughput.  Every contender is a fresh process timed from spawn to exit
(wall clock), on the same model, prompt, thread count and token budget:

- llamba: `--help`, `formats`, and one-row `generate`, `classify` and
  `generate --json-schema` jobs (JSON Lines in, JSON Lines out);
- llama.cpp's own tools: `llama-simple` (load, one prompt, exit), `llama-cli`
  (single turn, `-st`) and `llama-cli --help`;
- llama-cpp-python: `python -c` that imports `llama_cpp`, builds `Llama` and runs one
  completion.

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
                f"load, {args.tokens} tokens greedy, exit (its defaults otherwise)",
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
        for c in out[-3:]:
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
    if args.contenders != "all":
        wanted = {w.strip() for w in args.contenders.split(",")}
        out = [c for c in out if c.name in wanted]
    return out


def time_once(c: Contender) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(
        c.argv,
        env={**os.environ, **c.env},
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
            "# Start-up: one-row jobs and `--help`, wall time per process",
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
            " model load (memory-mapped, page cache warm), context, the job, output, exit.",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = common.resolve_model(args.model)
    facts = common.machine_facts(args.threads, model)
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        cs = contenders(args, model, Path(tmp))
        run(cs, args.repeats, time_once)
    common.write_report(report(args, cs, facts), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
