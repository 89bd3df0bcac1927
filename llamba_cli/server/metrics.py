"""Prometheus metrics of `llamba serve`, in the text exposition format (version 0.0.4).

Two sources: what the HTTP side counts (requests by endpoint and status, rejections,
client disconnects, time to first token, request latency), updated only on the event
loop's thread; and the engine's own counters (running and waiting requests, prompt
tokens evaluated and reused from the prefix cache, generated tokens, decode time),
read from the engine loop's snapshot when `/metrics` is scraped.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

# (metric, type, help, attribute of the engine loop's stats)
_ENGINE_METRICS = (
    ("llamba_requests_running", "gauge", "Requests decoding in a slot.", "running"),
    ("llamba_requests_waiting", "gauge", "Requests waiting for a slot.", "waiting"),
    (
        "llamba_engine_requests_total",
        "counter",
        "Requests the engine admitted.",
        "requests",
    ),
    (
        "llamba_prompt_tokens_total",
        "counter",
        "Prompt tokens of admitted requests.",
        "prompt_tokens",
    ),
    (
        "llamba_prompt_tokens_evaluated_total",
        "counter",
        "Prompt tokens llama.cpp computed (shared prefixes once).",
        "prompt_tokens_evaluated",
    ),
    (
        "llamba_prompt_tokens_reused_total",
        "counter",
        "Prompt tokens taken from the prefix cache instead of computed.",
        "prompt_tokens_reused",
    ),
    (
        "llamba_label_tokens_evaluated_total",
        "counter",
        "Label tokens computed for classification.",
        "label_tokens_evaluated",
    ),
    (
        "llamba_generation_tokens_total",
        "counter",
        "Tokens generated.",
        "generated_tokens",
    ),
    ("llamba_decode_steps_total", "counter", "llama_decode calls.", "steps"),
    (
        "llamba_decode_seconds_total",
        "counter",
        "Seconds spent inside llama_decode.",
        "decode_seconds",
    ),
    (
        "llamba_kv_retries_total",
        "counter",
        "Steps retried for lack of KV cache room.",
        "kv_retries",
    ),
)


@dataclass
class Histogram:
    buckets: tuple[float, ...] = _LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str) -> list[str]:
        out = []
        running = 0
        for bound, count in zip(self.buckets, self.counts, strict=True):
            running += count
            out.append(f'{name}_bucket{{le="{bound}"}} {running}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.n}')
        out.append(f"{name}_sum {self.total:.6f}")
        out.append(f"{name}_count {self.n}")
        return out


@dataclass
class Metrics:
    """What the HTTP side counts. Touched only from the event loop's thread."""

    http: Counter[tuple[str, int]] = field(default_factory=Counter)
    rejected: int = 0  # 429: the wait queue was full
    disconnected: int = 0  # client went away; its requests were aborted
    ttft: Histogram = field(default_factory=Histogram)
    latency: Histogram = field(default_factory=Histogram)

    def answered(self, endpoint: str, status: int) -> None:
        self.http[(endpoint, status)] += 1

    def render(self, engine: Any | None) -> str:
        """The exposition text; `engine` is the engine loop's stats (None while loading)."""
        lines: list[str] = []

        def metric(name: str, kind: str, help: str, samples: list[str]) -> None:
            lines.append(f"# HELP {name} {help}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(samples)

        metric(
            "llamba_http_requests_total",
            "counter",
            "HTTP requests answered, by endpoint and status code.",
            [
                f'llamba_http_requests_total{{endpoint="{ep}",status="{status}"}} {n}'
                for (ep, status), n in sorted(self.http.items())
            ],
        )
        errors = {"client": 0, "server": 0}
        for (_, status), n in self.http.items():
            if status >= 500:
                errors["server"] += n
            elif status >= 400 and status != 429:
                errors["client"] += n
        metric(
            "llamba_request_errors_total",
            "counter",
            "Requests answered with an error (4xx but 429: client; 5xx: server).",
            [
                f'llamba_request_errors_total{{kind="{k}"}} {errors[k]}'
                for k in ("client", "server")
            ],
        )
        metric(
            "llamba_requests_rejected_total",
            "counter",
            "Requests refused with 429 because the wait queue was full.",
            [f"llamba_requests_rejected_total {self.rejected}"],
        )
        metric(
            "llamba_requests_disconnected_total",
            "counter",
            "Requests aborted because the client disconnected.",
            [f"llamba_requests_disconnected_total {self.disconnected}"],
        )
        metric(
            "llamba_time_to_first_token_seconds",
            "histogram",
            "Time from receiving a streaming request to its first token.",
            self.ttft.lines("llamba_time_to_first_token_seconds"),
        )
        metric(
            "llamba_request_duration_seconds",
            "histogram",
            "Time from receiving a generation request to its last byte.",
            self.latency.lines("llamba_request_duration_seconds"),
        )
        metric(
            "llamba_model_loaded",
            "gauge",
            "1 once the model is loaded and the engine runs.",
            [f"llamba_model_loaded {int(engine is not None)}"],
        )
        if engine is not None:
            for name, kind, help, attr in _ENGINE_METRICS:
                value = _stat(engine, attr)
                if value is not None:
                    metric(name, kind, help, [f"{name} {value}"])
        return "\n".join(lines) + "\n"


def _stat(stats: Any, attr: str) -> Any:
    """A counter from the loop's stats, or from the engine stats nested in them."""
    for source in (stats, getattr(stats, "engine", None)):
        if source is not None and hasattr(source, attr):
            value = getattr(source, attr)
            return round(value, 6) if isinstance(value, float) else value
    return None
