"""Serving: N concurrent streaming clients against three OpenAI-compatible servers.

Contenders, each a server process on 127.0.0.1 with the same model, threads,
flash attention and per-sequence context:

1. llamba serve            - `llamba serve --slots S`
2. llama-server            - llama.cpp's server, `-np S` (as many slots)
3. llama-cpp-python server - `python -m llama_cpp.server` (one sequence at a time;
                             `--interrupt_requests false`, else a new request cuts
                             the running stream short)

For each client count N (default 1, 8, 32), N clients each send `--requests`
streaming `/v1/completions` requests back to back (greedy, end-of-generation banned,
`--max-tokens` tokens each), the same prompts in the same order for every
contender; contenders take turns per round (A B C A B C ...).  Reported with vLLM's
metric names: output_throughput (generated tokens / wall time of the level),
TTFT (send -> first token) and ITL (gap between streamed tokens), p50/p95.
Writes benchmarks/results/serve.md.

llama-cpp-python's server needs its extra dependencies:
`pip install 'llama-cpp-python[server]==0.3.36'` (only the extras are installed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

CONTENDERS = ("llamba", "server", "python")
NAMES = {
    "llamba": "llamba serve",
    "server": "llama-server",
    "python": "llama-cpp-python server",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="GGUF file (default: llamba's embedded Gemma 3 270M)")
    p.add_argument("--clients", default="1,8,32", help="concurrent client counts (default 1,8,32)")
    p.add_argument("--requests", type=int, default=4, help="requests per client per level")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    p.add_argument("--slots", type=int, help="server slots (default: the largest client count)")
    p.add_argument("--ctx", type=int, default=512, help="context tokens per sequence")
    p.add_argument("--threads", type=int, default=common.default_threads())
    p.add_argument("--repeats", type=int, default=3, help="rounds per level (medians reported)")
    p.add_argument(
        "--contenders",
        default=",".join(CONTENDERS),
        help=f"comma-separated subset of {','.join(CONTENDERS)}",
    )
    p.add_argument("--tools-bin", help="folder with llama.cpp's llama-server")
    p.add_argument("--server-timeout", type=float, default=300.0, help="seconds to start")
    p.add_argument("--request-timeout", type=float, default=1800.0, help="seconds per request")
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR / "serve.md")
    args = p.parse_args(argv)
    try:
        args.clients = [int(c) for c in args.clients.split(",") if c.strip()]
    except ValueError:
        p.error("--clients must be comma-separated integers")
    if not args.clients or min(args.clients) < 1:
        p.error("--clients must be positive")
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = set(args.contenders) - set(CONTENDERS)
    if unknown:
        p.error(f"unknown contenders: {', '.join(sorted(unknown))}")
    args.slots = args.slots or max(args.clients)
    for name in ("requests", "max_tokens", "slots", "threads", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


# -- servers ----------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    cmd: list[str]
    port: int
    health: str  # a GET path that answers 200 once the model is loaded
    log: Path = field(default_factory=lambda: Path(tempfile.mkstemp(suffix=".log")[1]))
    proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.contextmanager
def running(server: Server, timeout: float) -> Iterator[Server]:
    """Start `server`, wait until its health path answers 200, stop it afterwards."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with server.log.open("wb") as out:
        server.proc = subprocess.Popen(server.cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if server.proc.poll() is not None:
                tail = server.log.read_text(errors="replace").splitlines()[-15:]
                raise RuntimeError(
                    f"{server.name} exited with {server.proc.returncode}:\n" + "\n".join(tail)
                )
            with (
                contextlib.suppress(urllib.error.URLError, OSError),
                urllib.request.urlopen(server.base + server.health, timeout=5) as resp,
            ):
                if resp.status == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{server.name} not ready after {timeout:.0f}s ({server.log})")
            time.sleep(0.5)
        yield server
    finally:
        server.proc.terminate()
        try:
            server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(timeout=10)
        server.log.unlink(missing_ok=True)


# Runs llama-cpp-python's server with llama.cpp's extra buffer types off where llamba
# turns them off (CPUs with AMX), as the other benchmarks do for its `Llama`.
_PYTHON_SERVER = """
import runpy, sys
sys.path.insert(0, {bench!r})
import reference
sys.argv = ["llama_cpp.server", *{argv!r}]
with reference.extra_bufts_disabled():
    runpy.run_module("llama_cpp.server", run_name="__main__")
"""


def commands(args: argparse.Namespace, model: Path, tools: common.Tools) -> dict[str, Server]:
    threads = str(args.threads)
    servers: dict[str, Server] = {}
    port = common.free_port()
    servers["llamba"] = Server(
        NAMES["llamba"],
        [
            sys.executable, "-m", "llamba_cli", "serve",
            "--model", str(model),
            "--host", "127.0.0.1", "--port", str(port),
            "--slots", str(args.slots),
            "--ctx", str(args.ctx),
            "--n-batch", "512",
            "--threads", threads,
            "--flash-attn", "on",
            "--max-queue", "100000",
        ],
        port,
        "/health",
    )  # fmt: skip
    if tools.bin_dir is not None:
        port = common.free_port()
        servers["server"] = Server(
            NAMES["server"],
            [
                str(tools.path("llama-server")),
                "-m", str(model),
                "--host", "127.0.0.1", "--port", str(port),
                "-np", str(args.slots),
                "-c", str(args.slots * args.ctx),
                "-b", "512", "-ub", "512",
                "-fa", "on",
                "-t", threads,
                *([] if common.repack_supported() else ["--no-repack"]),
                "--no-webui",
            ],
            port,
            "/health",
        )  # fmt: skip
    port = common.free_port()
    argv = [
        "--model", str(model),
        "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", str(args.ctx),
        "--n_batch", "512",
        "--n_threads", threads,
        "--n_threads_batch", threads,
        "--flash_attn", "true",
        "--interrupt_requests", "false",
    ]  # fmt: skip
    servers["python"] = Server(
        NAMES["python"],
        [sys.executable, "-c", _PYTHON_SERVER.format(bench=str(common.BENCH_DIR), argv=argv)],
        port,
        "/v1/models",
    )
    return servers


# -- a streaming client -----------------------------------------------------------------


@dataclass
class Sample:
    """One streamed request: when it was sent, when each token arrived, what came back."""

    prompt_index: int
    sent: float
    arrivals: list[float] = field(default_factory=list)
    text: str = ""
    tokens: int = 0  # from the server's usage when it reports one, else streamed chunks
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.arrivals[0] - self.sent if self.arrivals else None

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.arrivals, self.arrivals[1:], strict=False)]


async def _body(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    """The response body, de-chunked when it is chunked."""
    if "chunked" not in headers.get("transfer-encoding", ""):
        while chunk := await reader.read(65536):
            yield chunk
        return
    while True:
        size_line = await reader.readline()
        if not size_line:
            return
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return
        yield await reader.readexactly(size)
        await reader.readexactly(2)


async def stream_completion(base: str, body: dict[str, Any], sample: Sample) -> None:
    host, port = base.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            (
                f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
                "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
            ).encode()
            + payload
        )
        sample.sent = time.perf_counter()
        await writer.drain()
        status = (await reader.readline()).decode(errors="replace").split()
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            key, _, value = line.decode(errors="replace").partition(":")
            headers[key.strip().lower()] = value.strip().lower()
        if len(status) < 2 or status[1] != "200":
            raw = b"".join([c async for c in _body(reader, headers)])
            sample.error = f"HTTP {' '.join(status[1:])}: {raw[:200]!r}"
            return
        buffer = b""
        parts: list[str] = []
        chunks = 0
        async for data in _body(reader, headers):
            buffer += data.replace(b"\r\n", b"\n")
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                for line in event.split(b"\n"):
                    if not line.startswith(b"data:"):
                        continue
                    text = line[5:].strip()
                    if text == b"[DONE]":
                        continue
                    obj = json.loads(text)
                    if obj.get("error"):
                        sample.error = str(obj["error"])[:200]
                    for choice in obj.get("choices") or []:
                        if choice.get("text"):
                            sample.arrivals.append(time.perf_counter())
                            parts.append(choice["text"])
                            chunks += 1
                    usage = obj.get("usage")
                    if usage and usage.get("completion_tokens"):
                        sample.tokens = int(usage["completion_tokens"])
        sample.text = "".join(parts)
        sample.tokens = sample.tokens or chunks
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def request_body(prompt: str, max_tokens: int, eog: list[int]) -> dict[str, Any]:
    return {
        "model": "bench",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        # every contender generates exactly max_tokens: end-of-generation is banned
        "ignore_eos": True,
        "logit_bias": {str(t): -100 for t in eog},
    }


@dataclass
class Level:
    """One contender at one client count, one round."""

    samples: list[Sample]
    wall: float

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.samples if s.error is None)

    @property
    def errors(self) -> list[str]:
        return [s.error for s in self.samples if s.error]


async def run_level(
    base: str, clients: int, per_client: int, prompts: list[str], body: Any, timeout: float
) -> Level:
    samples: list[Sample] = []

    async def client(c: int) -> None:
        for r in range(per_client):
            i = (c * per_client + r) % len(prompts)
            sample = Sample(prompt_index=i, sent=time.perf_counter())
            samples.append(sample)
            try:
                await asyncio.wait_for(stream_completion(base, body(prompts[i]), sample), timeout)
            except Exception as e:
                sample.error = f"{type(e).__name__}: {e}"

    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    return Level(samples, time.perf_counter() - t0)


def has_amx() -> bool:
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


# -- statistics and the report ------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


@dataclass
class Summary:
    output_throughput: float  # median over rounds
    request_throughput: float
    ttft_p50_ms: float
    ttft_p95_ms: float
    itl_p50_ms: float
    itl_p95_ms: float
    tpot_mean_ms: float
    tokens: int
    errors: list[str]


def summarize(levels: list[Level]) -> Summary:
    ok = [s for lv in levels for s in lv.samples if s.error is None]
    ttfts = [s.ttft * 1000 for s in ok if s.ttft is not None]
    itls = [x * 1000 for s in ok for x in s.itls]
    tpots = [
        (s.arrivals[-1] - s.arrivals[0]) * 1000 / (s.tokens - 1)
        for s in ok
        if s.tokens > 1 and s.arrivals
    ]
    return Summary(
        output_throughput=statistics.median(lv.tokens / lv.wall for lv in levels),
        request_throughput=statistics.median(
            sum(1 for s in lv.samples if s.error is None) / lv.wall for lv in levels
        ),
        ttft_p50_ms=percentile(ttfts, 0.5),
        ttft_p95_ms=percentile(ttfts, 0.95),
        itl_p50_ms=percentile(itls, 0.5),
        itl_p95_ms=percentile(itls, 0.95),
        tpot_mean_ms=statistics.fmean(tpots) if tpots else float("nan"),
        tokens=sum(lv.tokens for lv in levels),
        errors=[e for lv in levels for e in lv.errors],
    )


async def reference_texts(
    base: str, indices: list[int], prompts: list[str], body: Any
) -> dict[int, str]:
    """Each prompt's greedy text requested alone, one at a time (untimed)."""
    out: dict[int, str] = {}
    for i in indices:
        sample = Sample(prompt_index=i, sent=time.perf_counter())
        await stream_completion(base, body(prompts[i]), sample)
        if sample.error is None:
            out[i] = sample.text
    return out


def agreement(results: dict[int, list[Level]], alone: dict[int, str]) -> str | None:
    """How often llamba's greedy text at each client count equals its text for the same
    prompt requested alone (batch composition changes llama.cpp's numerics)."""
    parts = []
    for n in sorted(results):
        same = total = 0
        for lv in results[n]:
            for s in lv.samples:
                if s.error is None and s.prompt_index in alone:
                    total += 1
                    same += s.text == alone[s.prompt_index]
        if total:
            parts.append(f"{n} clients {same}/{total}")
    if not parts:
        return None
    return (
        "llamba greedy texts equal to the same prompt's text requested alone: "
        + ", ".join(parts)
        + " (llama.cpp's results vary with batch composition; see the README)"
    )


def ms(x: float) -> str:
    return "-" if x != x else f"{x:,.0f}"


def build_report(
    args: argparse.Namespace,
    facts: list[str],
    mean_prompt_tokens: float,
    results: dict[str, dict[int, Summary]],
    notes: list[str],
) -> str:
    header = [
        "clients",
        "contender",
        "output_throughput (tok/s)",
        "request_throughput (req/s)",
        "median_ttft_ms",
        "p95_ttft_ms",
        "median_itl_ms",
        "p95_itl_ms",
        "mean_tpot_ms",
        "llamba ÷ contender (tok/s)",
    ]
    rows = []
    checks = []
    for n in args.clients:
        mine = results.get("llamba", {}).get(n)
        for key in CONTENDERS:
            s = results.get(key, {}).get(n)
            if s is None:
                continue
            vs = common.ratio(mine.output_throughput, s.output_throughput) if mine else "-"
            rows.append(
                [
                    str(n),
                    NAMES[key],
                    f"{s.output_throughput:,.1f}",
                    f"{s.request_throughput:,.2f}",
                    ms(s.ttft_p50_ms),
                    ms(s.ttft_p95_ms),
                    ms(s.itl_p50_ms),
                    ms(s.itl_p95_ms),
                    ms(s.tpot_mean_ms),
                    "-" if key == "llamba" else vs,
                ]
            )
        server = results.get("server", {}).get(n)
        python = results.get("python", {}).get(n)
        if mine and server and n in (8, 32):
            ok = mine.output_throughput >= server.output_throughput
            checks.append(
                f"{n} clients: output tok/s at least llama-server's: {'yes' if ok else 'no'}"
            )
        if mine and server:
            ok = mine.ttft_p50_ms <= server.ttft_p50_ms
            checks.append(
                f"{n} clients: TTFT p50 no worse than llama-server's: {'yes' if ok else 'no'}"
            )
        if mine and python and n == 8:
            ok = mine.output_throughput >= 2 * python.output_throughput
            checks.append(
                f"{n} clients: at least 2x llama-cpp-python's server: {'yes' if ok else 'no'} "
                f"({common.ratio(mine.output_throughput, python.output_throughput)})"
            )
    lines = [
        "# Serving: concurrent streaming clients",
        "",
        f"Command: `{common.command_line()}`",
        "",
        *facts,
        f"- workload: per level, N clients each send {args.requests} streaming "
        f"`/v1/completions` requests back to back; greedy, end-of-generation banned, "
        f"{args.max_tokens} tokens each; prompts from `common.PROMPTS` (mean "
        f"{mean_prompt_tokens:.1f} tokens), the same ones in the same order for every "
        f"contender; {args.slots} slots x {args.ctx} context tokens; {args.repeats} "
        "interleaved rounds",
        "",
        common.markdown_table(header, rows),
        "",
        "output_throughput = generated tokens / wall time of the level (median round); "
        "TTFT = send -> first streamed token; ITL = gap between streamed tokens; "
        "TPOT = (last token - first token) / (tokens - 1); percentiles over all rounds.",
        "",
        *(f"- {c}" for c in checks),
        *(f"- {n}" for n in notes),
    ]
    return "\n".join(lines).rstrip()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from llamba_cli.engine import Model

    model_path = common.resolve_model(args.model)
    facts = common.machine_facts(args.threads, model_path)
    facts.append(f"- AMX (amx_tile in /proc/cpuinfo): {'yes' if has_amx() else 'no'}")
    model = Model(model_path)
    prompts = list(common.PROMPTS)
    mean_prompt = statistics.fmean(len(model.tokenize(p)) for p in prompts)
    eog = [t for t in range(model.n_vocab) if model.is_eog(t)]
    model.close()

    described = {
        "llamba": "llamba serve: `--slots S --ctx C --n-batch 512 --flash-attn on` "
        "(prefix cache on)",
        "server": "llama-server: `-np S -c S*C -b 512 -ub 512 -fa on`",
        "python": "llama-cpp-python server: `--n_ctx C --n_batch 512 --flash_attn true "
        "--interrupt_requests false` (it runs one request at a time)",
    }
    notes = [text for key, text in described.items() if key in args.contenders]
    tools = common.Tools(None)
    if "server" in args.contenders:
        tools = common.find_tools(args.tools_bin)
        if tools.bin_dir is None:
            notes.append(f"llama-server skipped: {tools.note}")
    servers = {k: v for k, v in commands(args, model_path, tools).items() if k in args.contenders}

    def body(prompt: str) -> dict[str, Any]:
        return request_body(prompt, args.max_tokens, eog)

    rounds: dict[str, dict[int, list[Level]]] = {k: {n: [] for n in args.clients} for k in servers}
    with contextlib.ExitStack() as stack:
        live: dict[str, Server] = {}
        for key, server in servers.items():
            print(f"starting {server.name} ...", file=sys.stderr)
            try:
                live[key] = stack.enter_context(running(server, args.server_timeout))
                # one small untimed request: warms the server up
                warm = Sample(prompt_index=0, sent=0)
                asyncio.run(stream_completion(server.base, request_body(prompts[0], 4, eog), warm))
                if warm.error:
                    raise RuntimeError(warm.error)
            except Exception as e:
                notes.append(f"**{server.name} failed to start**: {e}")
                print(f"  {server.name}: {e}", file=sys.stderr)
        for n in args.clients:
            for r in range(args.repeats):
                for key, server in live.items():
                    level = asyncio.run(
                        run_level(
                            server.base, n, args.requests, prompts, body, args.request_timeout
                        )
                    )
                    rounds[key][n].append(level)
                    print(
                        f"  {n} clients, round {r + 1}/{args.repeats}, {server.name}: "
                        f"{level.tokens / level.wall:,.1f} tok/s"
                        + (f", {len(level.errors)} errors" if level.errors else ""),
                        file=sys.stderr,
                    )
        alone: dict[int, str] = {}
        if "llamba" in live:
            used = sorted(
                {
                    s.prompt_index
                    for lvs in rounds["llamba"].values()
                    for lv in lvs
                    for s in lv.samples
                }
            )
            alone = asyncio.run(reference_texts(live["llamba"].base, used, prompts, body))
    results = {
        key: {n: summarize(levels) for n, levels in per.items() if levels}
        for key, per in rounds.items()
    }
    for key, per in results.items():
        for n, s in per.items():
            if s.errors:
                notes.append(
                    f"{NAMES[key]} at {n} clients: {len(s.errors)} failed requests, "
                    f"e.g. {s.errors[0]}"
                )
    agree = agreement(rounds.get("llamba", {}), alone)
    if agree:
        notes.append(agree)
    report = build_report(args, facts, mean_prompt, results, notes)
    common.write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
