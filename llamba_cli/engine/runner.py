"""Runner: the one owner of the llama.cpp context's KV memory and decode.

`run(plan)` applies the plan's KV operations, turns its chunks into one
`llama_decode`, and draws the next token for every chunk that asks (`chunk.sample`)
from the logits rows.  Logits are requested only for tokens that need them (the last
known token of a sequence, and label-branch tokens), so llama.cpp computes and
copies no others.
"""

from __future__ import annotations

import time

import numpy as np

from llamba_cli.engine.llama import Context
from llamba_cli.engine.request import Request
from llamba_cli.engine.sampler import Draw, draw
from llamba_cli.engine.scheduler import Chunk, EngineStats, Plan, StepOutput


class Runner:
    def __init__(self, ctx: Context, stats: EngineStats) -> None:
        self.ctx = ctx
        self.stats = stats

    def run(self, plan: Plan) -> StepOutput | None:
        """Apply `plan`'s KV operations, then decode its chunks as one batch and draw
        tokens.  None when the KV cache had no room for the batch (llama.cpp applied
        none of it: the scheduler frees memory and plans again)."""
        self._apply_kv_ops(plan)
        if not plan.chunks:
            return StepOutput(self.ctx.logits(0), [], [])
        rows = self._fill_batch(plan.chunks)
        t0 = time.perf_counter()
        rc = self.ctx.decode()
        self.stats.decode_seconds += time.perf_counter() - t0
        if rc == Context.DECODE_NO_KV:
            return None
        n_out = sum(len(r) for r in rows)
        logits = self.ctx.logits(n_out)
        return StepOutput(logits, rows, self._draw(plan.chunks, rows, logits))

    def _apply_kv_ops(self, plan: Plan) -> None:
        """Label rewinds, then dropped sequences (a freed sequence may be handed to a
        new request in this very plan), then prefix sharing, then prefix evictions.
        Copies go before evictions: an entry shared with a request this step may also
        be evicted this step (its sequence reused for a new entry); the request keeps
        the cells it was given."""
        for seq, pos in plan.trim:
            self.ctx.seq_rm(seq, pos, -1)
        for seq in plan.free:
            self.ctx.seq_rm(seq)
        for src, dst, n in plan.copies:
            self.ctx.seq_cp(src, dst, 0, n)
        for seq in plan.evict:
            self.ctx.seq_rm(seq)

    def _fill_batch(self, chunks: list[Chunk]) -> list[list[tuple[int, int]]]:
        """Write `chunks` into the context's batch; per chunk, its (position, logits
        row) pairs."""
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
        return rows

    @staticmethod
    def _draw(
        chunks: list[Chunk], rows: list[list[tuple[int, int]]], logits: np.ndarray
    ) -> list[Draw | None]:
        picked = [i for i, c in enumerate(chunks) if c.sample]
        reqs: list[Request] = []
        for i in picked:
            owner = chunks[i].owner
            assert isinstance(owner, Request)
            reqs.append(owner)
        drawn = draw(logits, [rows[i][-1][1] for i in picked], reqs)
        out: list[Draw | None] = [None] * len(chunks)
        for i, d in zip(picked, drawn, strict=True):
            out[i] = d
        return out

    def seq_pos_max(self, seq_id: int) -> int:
        """The highest position `seq_id` holds in the KV cache, -1 when it holds none
        (read-only; tests check that a finished sequence's KV is gone)."""
        return self.ctx.seq_pos_max(seq_id)
