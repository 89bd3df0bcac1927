"""Generation throughput: llamba's engine against what people use today.

Same model, prompts, thread count and flash-attention setting for every contender;
greedy decoding of `--tokens` tokens per prompt.  Contenders:

1. plain loop     - llama-cpp-python's `Llama`, one `llm(prompt, ...)` call per prompt
2. llama-server   - llama.cpp's server with `--slots` parallel slots, all prompts sent
                    concurrently over HTTP
3. batched-bench  - `llama-batched-bench`: llama.cpp's own batched decode loop on
                    random tokens, no sampling; its S_TG is the decode ceiling
4. llamba         - `llamba_cli.engine.Engine` with `--slots` slots

Model loading is excluded everywhere.  Rounds are interleaved (A B C D A B C D ...)
and medians reported.  Writes benchmarks/results/generate.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import reference
from common import Series, Tools

Runner = Callable[[], tuple[float, int]]
CONTENDERS = ("plain", "server", "batched", "llamba")


@dataclass
class Workload:
    """What every contender is asked to do, and the machine facts taken before it."""

    model_path: Path
    facts: list[str]
    prompts: list[str]
    prompt_tokens: list[int]
    tokens: int
    slots: int
    threads: int
    ctx: int
    repack: bool

    @property
    def expected_tokens(self) -> int:
        return len(self.prompts) * self.tokens

    @property
    def mean_prompt_tokens(self) -> float:
        return sum(self.prompt_tokens) / len(self.prompt_tokens)

    @property
    def parallel(self) -> int:
        return min(self.slots, len(self.prompts))

    def repack_flags(self) -> list[str]:
        return [] if self.repack else ["--no-repack"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="GGUF file (default: llamba's embedded Gemma 3 270M)")
    p.add_argument("--prompts", type=int, default=32, help="number of prompts (default 32)")
    p.add_argument("--tokens", type=int, default=64, help="tokens generated per prompt")
    p.add_argument("--slots", type=int, default=32, help="parallel sequences (llamba, server)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per contender")
    p.add_argument("--threads", type=int, default=common.default_threads())
    p.add_argument("--ctx", type=int, default=512, help="context tokens per sequence")
    p.add_argument(
        "--contenders",
        default=",".join(CONTENDERS),
        help=f"comma-separated subset of {','.join(CONTENDERS)}",
    )
    p.add_argument("--tools-bin", help="folder with llama-server and llama-batched-bench")
    p.add_argument(
        "--plain-ban-eos",
        action="store_true",
        help="ban end-of-generation tokens in the plain loop (logit_bias) so it always "
        "generates --tokens tokens; by default it runs as users write it and the actual "
        "count is reported",
    )
    p.add_argument(
        "--no-prefix-cache", action="store_true", help="run llamba without its prefix cache"
    )
    p.add_argument("--server-timeout", type=float, default=180.0, help="seconds to start")
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR / "generate.md")
    args = p.parse_args(argv)
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = set(args.contenders) - set(CONTENDERS)
    if unknown:
        p.error(f"unknown contenders: {', '.join(sorted(unknown))}")
    if not 1 <= args.prompts <= len(common.PROMPTS):
        p.error(f"--prompts must be between 1 and {len(common.PROMPTS)}")
    for name in ("tokens", "slots", "repeats", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    return args


# -- 1. plain loop ------------------------------------------------------------------


def eog_token_ids(llm: Any) -> list[int]:
    """Every end-of-generation token id of the model's vocabulary."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    return [t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)]


def plain_loop(w: Workload, stack: contextlib.ExitStack, ban_eos: bool) -> Runner:
    """One `Llama`, one call per prompt: the loop users write today."""
    llm = reference.load_llama(
        w.model_path,
        n_ctx=w.ctx,
        n_batch=512,
        n_threads=w.threads,
        n_threads_batch=w.threads,
        flash_attn=True,
        verbose=False,
    )
    stack.callback(llm.close)
    bias = {t: float("-inf") for t in eog_token_ids(llm)} if ban_eos else None
    llm(w.prompts[0], max_tokens=4, temperature=0)  # warm-up, untimed

    def run() -> tuple[float, int]:
        t0 = time.perf_counter()
        n = 0
        for prompt in w.prompts:
            out = llm(prompt, max_tokens=w.tokens, temperature=0, logit_bias=bias)
            n += out["usage"]["completion_tokens"]
        return n / (time.perf_counter() - t0), n

    return run


# -- 2. llama-server ----------------------------------------------------------------


def _http_json(url: str, payload: dict[str, Any] | None = None, timeout: float = 600) -> Any:
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def _wait_healthy(proc: subprocess.Popen[bytes], base: str, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").splitlines()[-15:]
            raise RuntimeError(f"llama-server exited with {proc.returncode}:\n" + "\n".join(tail))
        with contextlib.suppress(urllib.error.URLError, OSError, ValueError):
            if _http_json(f"{base}/health", timeout=5).get("status") == "ok":
                return
        time.sleep(0.5)
    raise RuntimeError(f"llama-server not healthy after {timeout:.0f}s (log: {log})")


@contextlib.contextmanager
def llama_server(cmd: list[str], port: int, timeout: float) -> Iterator[str]:
    """Start llama-server, yield its base URL once /health is ok, stop it afterwards."""
    log = Path(tempfile.mkstemp(prefix="llama-server-", suffix=".log")[1])
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, base, timeout, log)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.unlink(missing_ok=True)


def server_command(w: Workload, binary: Path, port: int) -> list[str]:
    return [
        str(binary),
        "-m", str(w.model_path),
        "-np", str(w.slots),
        "-c", str(w.slots * w.ctx),
        "-b", "512",
        "-ub", "512",
        "-fa", "on",
        "-t", str(w.threads),
        *w.repack_flags(),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--no-webui",
    ]  # fmt: skip


def server_contender(
    w: Workload, tools: Tools, stack: contextlib.ExitStack, timeout: float
) -> Runner:
    """llama-server with `slots` slots; every prompt in flight at once."""
    port = common.free_port()
    base = stack.enter_context(
        llama_server(server_command(w, tools.path("llama-server"), port), port, timeout)
    )
    pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(max_workers=w.slots))

    def complete(prompt: str, n_predict: int) -> int:
        body = {
            "prompt": prompt,
            "n_predict": n_predict,
            "temperature": 0,
            "ignore_eos": True,
            "cache_prompt": False,
        }
        return int(_http_json(f"{base}/completion", body)["tokens_predicted"])

    complete(w.prompts[0], 4)  # warm-up, untimed

    def run() -> tuple[float, int]:
        t0 = time.perf_counter()
        counts = list(pool.map(lambda p: complete(p, w.tokens), w.prompts))
        n = sum(counts)
        return n / (time.perf_counter() - t0), n

    return run


# -- 3. llama-batched-bench ---------------------------------------------------------


def batched_bench_command(w: Workload, binary: Path) -> list[str]:
    npp = round(w.mean_prompt_tokens)
    return [
        str(binary),
        "-m", str(w.model_path),
        "-c", str(w.parallel * (npp + w.tokens) + 64),
        "-b", "512",
        "-ub", "512",
        "-npp", str(npp),
        "-ntg", str(w.tokens),
        "-npl", str(w.parallel),
        "-fa", "on",
        "-t", str(w.threads),
        *w.repack_flags(),
        "-kvu",
        "--output-format", "jsonl",
    ]  # fmt: skip


def parse_batched_bench(output: str) -> dict[str, float]:
    """The result line of `llama-batched-bench --output-format jsonl`."""
    for line in reversed(output.splitlines()):
        line = line.strip()
        if line.startswith("{") and '"speed_tg"' in line:
            return {k: float(v) for k, v in json.loads(line).items()}
    raise RuntimeError("no result line in llama-batched-bench output:\n" + output[-2000:])


def batched_contender(w: Workload, tools: Tools, end_to_end: Series, overall: Series) -> Runner:
    """One llama-batched-bench process per round; returns its S_TG and records its
    generated-tokens-per-total-second and overall S in the side series."""
    cmd = batched_bench_command(w, tools.path("llama-batched-bench"))

    def run() -> tuple[float, int]:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"exit {proc.returncode}: {proc.stderr[-1500:]}")
        res = parse_batched_bench(proc.stdout + "\n" + proc.stderr)
        generated = int(res["pl"] * res["tg"])
        end_to_end.rates.append(generated / res["t"])
        end_to_end.work.append(generated)
        overall.rates.append(res["speed"])
        overall.work.append(int(res["n_kv"]))
        return res["speed_tg"], generated

    return run


# -- 4. llamba ----------------------------------------------------------------------


def llamba_contender(w: Workload, model: Any, prefix_cache: bool, stats: list[Any]) -> Runner:
    """A fresh llamba Engine (context) per round on the shared, already loaded model."""
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
    params = SamplingParams(temperature=0, max_tokens=w.tokens, ignore_eos=True)

    def generate(prompts: list[str], engine: Any) -> list[Any]:
        done = list(
            engine.run(Request(id=i, prompt=p, params=params) for i, p in enumerate(prompts))
        )
        errors = [r.error for r in done if r.error]
        if errors:
            raise RuntimeError(f"{len(errors)} requests failed: {errors[0]}")
        return done

    with contextlib.closing(Engine(config, model=model)) as warm:  # warm-up, untimed
        generate(w.prompts[:1], warm)

    def run() -> tuple[float, int]:
        with contextlib.closing(Engine(config, model=model)) as engine:
            t0 = time.perf_counter()
            done = generate(w.prompts, engine)
            elapsed = time.perf_counter() - t0
            stats.append(engine.stats)
        n = sum(r.completion_tokens for r in done)
        return n / elapsed, n

    return run


# -- report -------------------------------------------------------------------------


def build_report(
    args: argparse.Namespace,
    w: Workload,
    series: list[Series],
    extra: dict[str, Series],
    notes: list[str],
) -> str:
    llamba = next((s for s in series if s.name == "llamba"), None)
    base = llamba.median if llamba else float("nan")
    rows = []
    for s in [*series, *extra.values()]:
        if s.error or not s.rates:
            continue
        work = "/".join(sorted({f"{n:,}" for n in s.work}))
        # llama.cpp's overall S counts prompt tokens too: no ratio against generated tok/s.
        vs = "-" if s is extra.get("overall") else common.ratio(base, s.median)
        rows.append([s.name, f"{s.median:,.1f}", s.spread(), work, vs])
    table = common.markdown_table(
        ["contender", "median tok/s", "min-max", "generated tokens", "llamba ÷ contender"], rows
    )
    workload = (
        f"- workload: {len(w.prompts)} prompts (mean {w.mean_prompt_tokens:.1f} prompt tokens), "
        f"{w.tokens} generated tokens each (expected total {w.expected_tokens:,}), "
        f"{w.slots} slots, {w.ctx} context tokens per sequence, "
        f"{args.repeats} interleaved rounds, medians reported"
    )
    lines = [
        "# Generation throughput",
        "",
        f"Command: `{common.command_line()}`",
        "",
        *w.facts,
        workload,
        "",
        table,
        "",
        "tok/s = generated tokens / wall time of the whole run (model load excluded).",
        "",
        *(f"- {n}" for n in notes),
    ]
    return "\n".join(lines).rstrip()


def contender_notes(args: argparse.Namespace, w: Workload, series: list[Series]) -> list[str]:
    described = {
        "plain": "plain loop: one llama-cpp-python `Llama`, "
        "`llm(prompt, max_tokens=N, temperature=0)` per prompt"
        + (" with end-of-generation tokens banned by `logit_bias`" if args.plain_ban_eos else ""),
        "server": f"llama-server: `-np {w.slots}`, all prompts sent at once to `/completion` "
        "with `ignore_eos`, `cache_prompt: false`; wall time from first send to last response",
        "batched": f"llama-batched-bench: `-npp {round(w.mean_prompt_tokens)} -ntg {w.tokens} "
        f"-npl {w.parallel} -kvu` on random tokens without sampling; S_TG is decode only "
        "(its ceiling), 'end to end' is its generated tokens / (prefill + decode time), "
        "'overall S' counts prompt and generated tokens together (as llama.cpp prints it)",
        "llamba": f"llamba: `Engine(slots={w.slots}, prefix_cache={not args.no_prefix_cache})`, "
        "`ignore_eos=True`, a fresh engine context per round on the loaded model",
    }
    notes = [text for key, text in described.items() if key in args.contenders]
    for s in series:
        if s.error:
            notes.append(f"**{s.name} failed**: {s.error}")
        elif s.rates and min(s.work) != w.expected_tokens and s.name != "llama-batched-bench S_TG":
            notes.append(
                f"{s.name} generated {min(s.work):,}-{max(s.work):,} tokens instead of "
                f"{w.expected_tokens:,} (stopped at end-of-generation); its rate uses actual counts"
            )
    return notes


def llamba_stats_note(stats: list[Any]) -> str | None:
    if not stats:
        return None
    st = stats[-1]
    return (
        f"llamba engine stats (last round): {st.prompt_tokens_evaluated:,} prompt tokens "
        f"evaluated, {st.prompt_tokens_reused:,} reused, {st.generated_tokens:,} generated "
        f"in {st.steps:,} decode steps ({st.decode_seconds:.2f}s inside llama_decode)"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from llamba_cli.engine import Model

    model_path = common.resolve_model(args.model)
    facts = common.machine_facts(args.threads, model_path)  # before our own load
    model = Model(model_path)
    prompts = list(common.PROMPTS[: args.prompts])
    w = Workload(
        model_path=model_path,
        facts=facts,
        prompts=prompts,
        prompt_tokens=[len(model.tokenize(p)) for p in prompts],
        tokens=args.tokens,
        slots=args.slots,
        threads=args.threads,
        ctx=args.ctx,
        repack=common.repack_supported(),
    )
    if max(w.prompt_tokens) + w.tokens > w.ctx:
        sys.exit(f"--ctx {w.ctx} is too small for {max(w.prompt_tokens)} + {w.tokens} tokens")

    notes: list[str] = []
    tools = Tools(None)
    if {"server", "batched"} & set(args.contenders):
        tools = common.find_tools(args.tools_bin)
        if tools.bin_dir is None:
            notes.append(f"llama.cpp tool columns skipped: {tools.note}")
            print(f"skipping llama.cpp tools: {tools.note}", file=sys.stderr)

    series: list[Series] = []
    runners: list[tuple[Series, Runner]] = []
    extra = {
        "end_to_end": Series("llama-batched-bench end to end"),
        "overall": Series("llama-batched-bench overall S (prompt+gen t/s)"),
    }
    llamba_stats: list[Any] = []
    with contextlib.ExitStack() as stack:
        stack.callback(model.close)

        def add(name: str, make: Callable[[], Runner]) -> None:
            common.set_up(name, make, series, runners)

        if "plain" in args.contenders:
            add("plain loop (llama-cpp-python)", lambda: plain_loop(w, stack, args.plain_ban_eos))
        if tools.bin_dir is not None and "server" in args.contenders:
            add("llama-server", lambda: server_contender(w, tools, stack, args.server_timeout))
        if tools.bin_dir is not None and "batched" in args.contenders:
            add(
                "llama-batched-bench S_TG",
                lambda: batched_contender(w, tools, extra["end_to_end"], extra["overall"]),
            )
        if "llamba" in args.contenders:
            add(
                "llamba",
                lambda: llamba_contender(w, model, not args.no_prefix_cache, llamba_stats),
            )
        common.interleave(runners, args.repeats)

    notes = contender_notes(args, w, series) + notes
    stats_note = llamba_stats_note(llamba_stats)
    if stats_note:
        notes.append(stats_note)
    common.write_report(build_report(args, w, series, extra, notes), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
