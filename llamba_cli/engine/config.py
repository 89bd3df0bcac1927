"""Engine and sampling configuration: frozen, validated once at construction.

Names follow llama.cpp (`n_batch`, `n_gpu_layers`, `flash_attn`) and OpenAI
(`temperature`, `top_p`, `presence_penalty`) so flags mean what users already know.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

from llamba_cli.errors import ConfigError

FLASH_ATTN_MODES = ("auto", "on", "off")
MAX_LOGPROBS = 20  # top alternatives per token, as OpenAI's top_logprobs
KV_CELL_STEP = 256  # llama.cpp rounds a context's KV cells up to a multiple of this


def default_threads() -> int:
    """Physical-ish core count: llama.cpp's matmuls gain nothing from SMT siblings."""
    n = os.cpu_count() or 1
    return max(1, n // 2) if n > 8 else n


@dataclass(frozen=True)
class EngineConfig:
    """How the llama.cpp context is built and how many sequences run at once.

    `slots` sequences decode together; each may hold up to `n_ctx_seq` tokens
    (prompt + completion).  The KV cache is one unified pool of
    `slots * n_ctx_seq + prefix_cache_tokens` cells, so a short sequence leaves
    room for a long one and shared prefixes are stored once.
    """

    model_path: str
    slots: int = 16
    n_ctx_seq: int = 2048
    n_batch: int = 512
    n_threads: int = field(default_factory=default_threads)
    flash_attn: str = "auto"
    n_gpu_layers: int = -1
    repack: bool | None = None  # llama.cpp weight repacking; None = on unless the CPU has AMX
    prefix_cache: bool = True
    prefix_cache_tokens: int = 4096
    prefix_min_tokens: int = 16
    lookahead: int = 64
    kv_cells: int | None = None  # override the unified KV size (default: see n_ctx)

    def __post_init__(self) -> None:
        _check(1 <= self.slots <= 240, f"slots must be between 1 and 240, got {self.slots}")
        _check(self.n_ctx_seq >= 16, f"ctx must be at least 16 tokens, got {self.n_ctx_seq}")
        # llama.cpp reserves an output row per sequence and aborts the process
        # (GGML_ASSERT(n_outputs_max <= cparams.n_outputs_max)) unless
        # n_seq_max <= min(n_batch, n_ctx); sequences are the slots plus the prefix ones.
        n_seq = self.slots + self.prefix_slots
        _check(
            self.n_batch >= n_seq,
            f"n-batch ({self.n_batch}) must be at least {n_seq}: llama.cpp needs an output "
            f"row per sequence ({self.slots} slot{'s' if self.slots != 1 else ''}"
            + (f" + {self.prefix_slots} for the prefix cache" if self.prefix_slots else "")
            + "); raise --n-batch or lower --slots",
        )
        _check(self.n_ctx >= n_seq, f"the KV cache ({self.n_ctx} cells) is too small")
        # llama.cpp takes these as 32-bit integers; larger values would wrap silently.
        _check(self.n_ctx < 1 << 31, f"slots x ctx must be below 2**31 tokens, got {self.n_ctx}")
        _check(self.n_batch <= 1 << 20, f"n-batch must be at most {1 << 20}, got {self.n_batch}")
        _check(self.n_threads <= 1024, f"threads must be at most 1024, got {self.n_threads}")
        _check(self.n_threads >= 1, f"threads must be >= 1, got {self.n_threads}")
        _check(
            self.flash_attn in FLASH_ATTN_MODES,
            f"flash-attn must be one of {', '.join(FLASH_ATTN_MODES)}, got {self.flash_attn!r}",
        )
        _check(self.prefix_min_tokens >= 1, "prefix_min_tokens must be >= 1")
        _check(self.prefix_cache_tokens >= 0, "prefix_cache_tokens must be >= 0")
        _check(self.lookahead >= 1, f"lookahead must be >= 1, got {self.lookahead}")

    @property
    def n_ctx(self) -> int:
        """Total KV cells of the unified cache."""
        if self.kv_cells is not None:
            return self.kv_cells
        reserve = self.prefix_cache_tokens if self.prefix_cache else 0
        return self.slots * self.n_ctx_seq + reserve

    def sized_for(self, sequences: int | None, cells: int | None = None) -> EngineConfig:
        """This configuration for a workload of at most `sequences` requests (None:
        unknown): no more slots than requests, and no prefix cache when a single
        request has nothing to share it with.  `cells`, when known, bounds the KV cells
        the work's sequences hold at once (cached prefixes included): the KV cache then
        has no more than that, in llama.cpp's steps of 256.  Less memory and a faster
        start, the same results."""
        if sequences is None or self.kv_cells is not None:
            return self
        slots = max(1, min(self.slots, sequences))
        prefix_cache = self.prefix_cache and sequences > 1
        sized = self
        if (slots, prefix_cache) != (self.slots, self.prefix_cache):
            sized = dataclasses.replace(self, slots=slots, prefix_cache=prefix_cache)
        if cells is not None:
            need = max(cells, sized.slots + sized.prefix_slots)
            kv = -(-need // KV_CELL_STEP) * KV_CELL_STEP
            if kv < sized.n_ctx:
                sized = dataclasses.replace(sized, kv_cells=kv)
        return sized

    @property
    def prefix_slots(self) -> int:
        """Sequence ids reserved for cached prefixes (after the `slots` row sequences)."""
        return 8 if self.prefix_cache else 0


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding parameters (llama.cpp defaults unless noted).

    temperature 0 is greedy.  Penalties look at the last `repeat_last_n` generated
    tokens.  `logit_bias` maps token id -> additive bias (OpenAI semantics; -inf bans).
    `seed` fixes this request's own random stream, so its draws do not depend on
    which other requests share a batch.  `logprobs`: None for none; 0 for each
    generated token's log-probability; 1..20 for that many top alternatives as well
    (log-softmax of the logits after logit bias: the model's distribution, before
    penalties, grammar and the top-k/top-p/min-p/temperature chain).
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_last_n: int = 64
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self) -> None:
        _check(
            0 <= self.temperature < math.inf,
            f"temperature must be a finite number >= 0, got {self.temperature}",
        )
        _check(self.top_k >= 0, f"top-k must be >= 0 (0 = off), got {self.top_k}")
        _check(0 < self.top_p <= 1, f"top-p must be in (0, 1], got {self.top_p}")
        _check(0 <= self.min_p < 1, f"min-p must be in [0, 1), got {self.min_p}")
        _check(
            0 < self.repeat_penalty < math.inf,
            f"repeat-penalty must be a finite number > 0, got {self.repeat_penalty}",
        )
        _check(
            -2 <= self.presence_penalty <= 2,
            f"presence-penalty must be in [-2, 2], got {self.presence_penalty}",
        )
        _check(
            -2 <= self.frequency_penalty <= 2,
            f"frequency-penalty must be in [-2, 2], got {self.frequency_penalty}",
        )
        _check(self.repeat_last_n >= 0, "repeat_last_n must be >= 0")
        _check(self.max_tokens >= 1, f"max-tokens must be >= 1, got {self.max_tokens}")
        _check(all(s for s in self.stop), "stop strings must not be empty")
        for tok, bias in self.logit_bias:
            _check(tok >= 0, f"logit bias token ids must be >= 0, got {tok}")
            _check(not math.isnan(bias), "logit bias must be a number")
        if self.logprobs is not None:
            _check(
                0 <= self.logprobs <= MAX_LOGPROBS,
                f"logprobs must be between 0 and {MAX_LOGPROBS}, got {self.logprobs}",
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return (
            self.repeat_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        ) and self.repeat_last_n > 0


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
