"""Runner: turns a `Plan` into one `llama_decode` and hands back the logits rows.

Logits are requested only for tokens that need them (the last known token of a
sequence, and label-branch tokens), so llama.cpp computes and copies no others.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llamba_cli.engine.llama import Context
from llamba_cli.engine.scheduler import Chunk, Plan


@dataclass
class StepOutput:
    logits: np.ndarray  # [n_outputs, n_vocab], valid until the next decode
    rows: list[list[tuple[int, int]]]  # per chunk: (position, logits row) pairs


class Runner:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def apply_kv_ops(self, plan: Plan) -> None:
        """Prefix sharing, then evictions, both before the decode that relies on them.

        Copies go first: an entry shared with a request this step may also be evicted
        this step (its sequence id reused for a new entry); the request keeps the
        cells it was given."""
        for src, dst, n in plan.copies:
            self.ctx.seq_cp(src, dst, 0, n)
        for seq in plan.evict:
            self.ctx.seq_rm(seq)

    def run(self, chunks: list[Chunk]) -> StepOutput | None:
        """Decode `chunks` as one batch. None when the KV cache had no room (nothing
        was applied: the caller frees memory and schedules again)."""
        b = self.ctx.batch
        i = 0
        n_out = 0
        rows: list[list[tuple[int, int]]] = []
        for c in chunks:
            owner = c.owner
            n = c.end - c.start
            b.token[i : i + n] = owner.tokens[c.start : c.end]
            b.pos[i : i + n] = np.arange(c.start, c.end, dtype=np.int32)
            b.seq_id[i : i + n, 0] = owner.seq_id
            b.logits[i : i + n] = 0
            out: list[tuple[int, int]] = []
            # Only the chunk's tail can want logits in generation; label branches
            # want every position from their branch point on.
            sf = owner.score_from
            first = min(max(c.start, sf), c.end - 1) if sf >= 0 else c.end - 1
            for pos in range(first, c.end):
                if owner.wants_logits(pos):
                    b.logits[i + pos - c.start] = 1
                    out.append((pos, n_out))
                    n_out += 1
            rows.append(out)
            i += n
        b.set_size(i)
        if self.ctx.decode() == Context.DECODE_NO_KV:
            return None
        return StepOutput(self.ctx.logits(n_out), rows)
