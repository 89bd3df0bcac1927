"""Between the engine and the output: input rows become `Request`s, finished requests
become output rows, written in input order.

Each request carries its input row and sample number in `Request.tag`; the only
state kept here is the reorder buffer, bounded by what is in flight.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from llamba_cli.engine import Request, normalize
from llamba_cli.errors import RowError
from llamba_cli.job.readers import InputRow
from llamba_cli.job.store import OutputStore
from llamba_cli.job.summary import JobSummary, ProgressSink

if TYPE_CHECKING:
    from llamba_cli.job.execute import Job
    from llamba_cli.job.structured import Constraint


def kept_name(column: str, taken: Sequence[str]) -> str:
    """The output name of kept input column `column`: itself, or `input_<column>` when
    the output already has a column of that name."""
    return column if column not in taken else f"input_{column}"


def row_seed(base: int, row_id: str, sample: int) -> int:
    """A row's own seed: stable across runs, shards and batch composition."""
    key = f"{base}\0{row_id}\0{sample}".encode("utf-8", "surrogatepass")
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class ResultWriter:
    """Turns rows into requests and finished requests into output rows, in input order."""

    def __init__(
        self, job: Job, store: OutputStore, summary: JobSummary, progress: ProgressSink
    ) -> None:
        self.job = job
        self.store = store
        self.summary = summary
        self.progress = progress
        self.pending: dict[int, Request] = {}  # finished out of order, by sequence number
        self.next_out = 0
        self.logprobs = getattr(job.spec.sampling, "logprobs", None) is not None

    def requests(self) -> Iterator[Request]:
        """One request per row and sample, numbered in input order, its row as `tag`."""
        spec = self.job.spec
        seq = 0
        labels = self.job.labels
        grammar = self.job.constraint.gbnf if self.job.constraint is not None else None
        for row in self.job.rows(self.store, self.summary):
            try:
                prompt, error = self.job.prompt(row), None
            except RowError as e:
                prompt, error = "", str(e)
            for sample in range(spec.n):
                seed = row_seed(spec.seed, row.id, sample)
                req = Request(
                    id=seq,
                    prompt=prompt,
                    params=spec.row_sampling(seed, self.job.format.stop),
                    labels=labels,
                    label_delimiter=spec.label_delimiter,
                    sample=sample,
                    grammar_text=grammar,
                    tag=row,
                )
                if error is not None:
                    req.finish("error", error)
                seq += 1
                yield req

    def finished(self, req: Request) -> None:
        self.pending[req.id] = req
        while self.next_out in self.pending:
            self._write(self.pending.pop(self.next_out))
            self.next_out += 1

    def _write(self, req: Request) -> None:
        spec = self.job.spec
        row: InputRow = req.tag
        out: dict[str, Any] = {"id": row.id}
        if spec.n > 1:
            out["sample"] = req.sample
        constraint = self.job.constraint
        with_json = constraint is not None and constraint.is_json
        json_value: Any = None
        if constraint is not None and with_json and req.error is None:
            try:
                json_value = constraint.json_value(req.text, self.store.format)
            except (ValueError, TypeError, AttributeError) as e:
                # the grammar rules this out; never pass broken JSON on
                req.error = f"output is not valid JSON: {e}"
            if self.store.format == "parquet" and not _fits_column(json_value, constraint):
                # e.g. an integer beyond 64 bits, which JSON allows and Parquet cannot hold
                kind = constraint.json_type
                req.error = f"output JSON does not fit the Parquet column type {kind}"
                json_value = None
        if self.job.labels is None:
            out["text"] = req.text if req.error is None else None
            if with_json:
                out["json"] = json_value
            out.update(
                finish_reason=req.finish_reason,
                prompt_tokens=req.prompt_tokens,
                completion_tokens=req.completion_tokens,
            )
            if self.logprobs:
                out["logprobs"] = _logprob_column(getattr(req, "logprobs", None))
        else:
            out.update(_classification_columns(self.job.labels, req.label_logprobs))
            out["prompt_tokens"] = req.prompt_tokens
        out["error"] = req.error
        data = row.data or {}
        for col in spec.keep_columns:
            out[kept_name(col, list(out))] = data.get(col)
        self.store.write(out)
        self.summary.rows_written += 1
        failed = req.error is not None
        self.summary.errors += failed
        self.progress.advance(1, int(failed), req.completion_tokens)


def _fits_column(value: Any, constraint: Constraint) -> bool:
    """Whether `value` can be stored in the Parquet `json` column (text always can)."""
    if constraint.json_type is None:
        return True
    from llamba_cli.job.columns import fits  # Arrow: only for a Parquet output

    return fits(value, constraint.json_type)


def _logprob_column(logprobs: Any) -> list[dict[str, Any]] | None:
    """The `logprobs` column of a row: per generated token its text, its logprob and
    the top alternatives (`job.columns.LOGPROB_TYPE`).  Token text is the token's bytes
    as UTF-8, a byte that is part of a character split across tokens shown as U+FFFD."""
    if logprobs is None:
        return None
    return [
        {
            "token": _token_text(entry.text),
            "logprob": float(entry.logprob),
            "top": [
                {"token": _token_text(text), "logprob": float(lp)} for _, text, lp in entry.top
            ],
        }
        for entry in logprobs
    ]


def _token_text(piece: bytes) -> str:
    return piece.decode("utf-8", "replace")


def _classification_columns(
    labels: tuple[str, ...], logprobs: list[float] | None
) -> dict[str, Any]:
    """`label`, `confidence`, then `p_<label>` and `logprob_<label>` per label."""
    cols: dict[str, Any] = {}
    if logprobs is None:
        cols["label"] = None
        cols["confidence"] = None
        cols.update({f"p_{lab}": None for lab in labels})
        cols.update({f"logprob_{lab}": None for lab in labels})
        return cols
    probs = normalize(logprobs)
    best = max(range(len(labels)), key=probs.__getitem__)
    cols["label"] = labels[best]
    cols["confidence"] = probs[best]
    cols.update({f"p_{lab}": p for lab, p in zip(labels, probs, strict=True)})
    cols.update({f"logprob_{lab}": lp for lab, lp in zip(labels, logprobs, strict=True)})
    return cols
