"""`task = "batch"`: OpenAI Batch files in, OpenAI Batch output out, as a job.

Each input line is one request of OpenAI's Batch API:

    {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

`url` is `/v1/chat/completions`, `/v1/completions` or llamba's `/v1/classify`, and
`body` is what `llamba serve` accepts there: the protocol layer (`llamba_cli.openai`)
maps it to engine requests and their results to the response body, for the server
and for this task alike, so a line's `response.body` is what the server would answer.
`body.model` is accepted and ignored (the loaded model answers, and responses name
it), and `body.stream` is ignored (a batch has no one to stream to).

This is a job task like any other: `BatchJob` is a `Job` (this layer sits above the
job layer, so callers pass it to `run_job` as the opener of `task = "batch"` specs),
`custom_id` is the row id, so resume, `--shard`, duplicate detection,
`--retry-errors`, `--limit` and `--max-errors` work on it, and output is written in
input order through the job's `OutputStore`.  A request whose
body sets no `seed` samples from one derived from (job seed, custom_id, choice), so a
rerun or another shard draws the same text.

Output, JSON Lines: one line per request in OpenAI's Batch output shape,

    {"id": "batch_req_…", "custom_id": "r1",
     "response": {"status_code": 200, "request_id": "req_…", "body": {…}}, "error": null}

A line that cannot be answered (invalid JSON, no custom_id, a method other than POST,
an unknown url, an invalid body, a prompt too long for the context, a failure while
generating) has `response` null and `error` = {"code", "message"}, `code` being the
error type the server would answer with.  Parquet output has one row per request
with the response flattened into columns (`batch_schema`) and the whole body as JSON
text.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pyarrow as pa

from llamba_cli.engine import Request
from llamba_cli.errors import InputError, RowError
from llamba_cli.job.execute import Job, RowWriter
from llamba_cli.job.readers import InputRow
from llamba_cli.job.store import OutputStore
from llamba_cli.job.summary import JobSummary, ProgressSink
from llamba_cli.job.writer import row_seed
from llamba_cli.openai.api import OpenAIApi
from llamba_cli.openai.calls import Call
from llamba_cli.openai.errors import ApiError, InvalidRequest
from llamba_cli.openai.served import served_model

_TEXT_CHOICE = pa.struct(
    [("index", pa.int64()), ("text", pa.string()), ("finish_reason", pa.string())]
)
_LABEL = pa.struct(
    [("label", pa.string()), ("probability", pa.float64()), ("logprob", pa.float64())]
)
_ERROR = pa.struct([("code", pa.string()), ("message", pa.string())])


def batch_schema() -> pa.Schema:
    """The Parquet columns of a batch job's output, one row per request.

    `custom_id`, `id`, `url`, `status_code`, `request_id`; for generation `text` and
    `finish_reason` of the first choice (the only one unless `n` > 1 or several
    prompts) and `choices` with every choice's index, text and finish reason; for
    classification `label`, `confidence` and `labels` (label, probability, logprob);
    usage as `prompt_tokens`, `completion_tokens`, `total_tokens`, `cached_tokens`;
    `body`, the whole response body as JSON text; `error` (code, message), null when
    the request succeeded.
    """
    return pa.schema(
        [
            ("custom_id", pa.string()),
            ("id", pa.string()),
            ("url", pa.string()),
            ("status_code", pa.int64()),
            ("request_id", pa.string()),
            ("text", pa.string()),
            ("finish_reason", pa.string()),
            ("choices", pa.list_(_TEXT_CHOICE)),
            ("label", pa.string()),
            ("confidence", pa.float64()),
            ("labels", pa.list_(_LABEL)),
            ("prompt_tokens", pa.int64()),
            ("completion_tokens", pa.int64()),
            ("total_tokens", pa.int64()),
            ("cached_tokens", pa.int64()),
            ("body", pa.string()),
            ("error", _ERROR),
        ]
    )


class BatchJob(Job):
    """A job whose rows are OpenAI Batch requests (see the module docstring)."""

    tasks = ("batch",)
    id_field = "custom_id"

    def check_input(self) -> None:
        if self.source.format != "jsonl":
            raise InputError(
                f"cannot read '{self.source.path}' as a batch: a batch file is JSON Lines"
                " (one request a line: custom_id, method, url, body)"
            )
        served = served_model(self.model, n_ctx_seq=self.spec.ctx, format_name=self.spec.format)
        self.api = OpenAIApi(served)

    def output_schema(self) -> pa.Schema:
        return batch_schema()

    def writer(self, store: OutputStore, summary: JobSummary, progress: ProgressSink) -> RowWriter:
        return BatchWriter(self, store, summary, progress)

    def call(self, row: InputRow, call_id: str | None = None) -> tuple[str, Call]:
        """The url and `Call` of one input line; `InvalidRequest` if it has none."""
        if row.error is not None or row.data is None:
            raise InvalidRequest(row.error or "unreadable line")
        data = row.data
        if data.get("custom_id") in (None, ""):
            raise InvalidRequest("custom_id is missing", param="custom_id")
        method = data.get("method")
        if method != "POST":
            raise InvalidRequest(f"method must be POST, got {method!r}", param="method")
        url = data.get("url")
        if not isinstance(url, str):
            raise InvalidRequest("url must be a string", param="url")
        call = self.api.call(url, data.get("body"), call_id=call_id)
        for req in call.requests:
            if req.labels is None and req.params.seed is None:
                seed = row_seed(self.spec.seed, row.id, req.sample)
                req.params = dataclasses.replace(req.params, seed=seed)
        return url, call

    def prompt(self, row: InputRow) -> str:
        """The (first) prompt a line runs, for `validate` and `--dry-run`."""
        try:
            _, call = self.call(row)
        except ApiError as e:
            raise RowError(e.message) from None
        return call.requests[0].prompt


@dataclass
class _Line:
    """One input line on its way through the engine."""

    row: InputRow
    key: str  # the random part of the line's ids
    url: str | None = None
    call: Call | None = None
    error: ApiError | None = None
    waiting: int = 0  # requests not finished yet
    requests: list[Request] = field(default_factory=list)


class BatchWriter:
    """Input lines -> engine requests (all of a line's choices) -> one output line each,
    in input order."""

    def __init__(
        self, job: BatchJob, store: OutputStore, summary: JobSummary, progress: ProgressSink
    ) -> None:
        self.job = job
        self.store = store
        self.summary = summary
        self.progress = progress
        self.lines: dict[int, _Line] = {}
        self.next_out = 0

    def requests(self) -> Iterator[Request]:
        for seq, row in enumerate(self.job.rows(self.store, self.summary)):
            line = _Line(row, key=uuid.uuid4().hex)
            url = (row.data or {}).get("url")
            line.url = url if isinstance(url, str) else None
            try:
                _, line.call = self.job.call(row, call_id=line.key)
                line.requests = line.call.requests
            except ApiError as e:
                line.error = e
                # A request that is already finished passes through the engine, so an
                # error line keeps its place in the output order.
                failed = Request(id=line.key, prompt="")
                failed.finish("error", e.message)
                line.requests = [failed]
            line.waiting = len(line.requests)
            self.lines[seq] = line
            for req in line.requests:
                req.tag = seq
                yield req

    def finished(self, req: Request) -> None:
        self.lines[req.tag].waiting -= 1
        while (line := self.lines.get(self.next_out)) is not None and not line.waiting:
            del self.lines[self.next_out]
            self.next_out += 1
            self._write(line)

    def _write(self, line: _Line) -> None:
        body: dict[str, Any] | None = None
        error = line.error
        if error is None:
            assert line.call is not None
            try:
                body = line.call.response()
            except ApiError as e:
                error = e
        if self.store.format == "jsonl":
            out = _output_line(line, body, error)
        else:
            out = _output_row(line, body, error)
        self.store.write(out)
        self.summary.rows_written += 1
        self.summary.errors += error is not None
        tokens = sum(req.completion_tokens for req in line.requests)
        self.progress.advance(1, int(error is not None), tokens)


def _error_object(error: ApiError) -> dict[str, Any]:
    return {"code": error.code or error.type, "message": error.message}


def _output_line(
    line: _Line, body: dict[str, Any] | None, error: ApiError | None
) -> dict[str, Any]:
    """One line of OpenAI's Batch output."""
    response = None
    if body is not None:
        response = {"status_code": 200, "request_id": f"req_{line.key}", "body": body}
    return {
        "id": f"batch_req_{line.key}",
        "custom_id": line.row.id,
        "response": response,
        "error": None if error is None else _error_object(error),
    }


def _output_row(line: _Line, body: dict[str, Any] | None, error: ApiError | None) -> dict[str, Any]:
    """One Parquet row: the output line with its response flattened (`batch_schema`)."""
    out: dict[str, Any] = {
        "custom_id": line.row.id,
        "id": f"batch_req_{line.key}",
        "url": line.url,
        "error": None if error is None else _error_object(error),
    }
    if body is None:
        return out
    out["status_code"] = 200
    out["request_id"] = f"req_{line.key}"
    choices = body.get("choices")
    if choices is not None:
        texts = [
            {
                "index": c["index"],
                "text": c["message"]["content"] if "message" in c else c["text"],
                "finish_reason": c["finish_reason"],
            }
            for c in choices
        ]
        out["choices"] = texts
        out["text"] = texts[0]["text"]
        out["finish_reason"] = texts[0]["finish_reason"]
    else:
        out["label"] = body["label"]
        out["confidence"] = body["confidence"]
        out["labels"] = body["labels"]
    usage = body["usage"]
    out["prompt_tokens"] = usage["prompt_tokens"]
    out["completion_tokens"] = usage["completion_tokens"]
    out["total_tokens"] = usage["total_tokens"]
    out["cached_tokens"] = usage["prompt_tokens_details"]["cached_tokens"]
    out["body"] = orjson.dumps(body).decode()
    return out
