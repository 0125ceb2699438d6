"""Logs: one JSON object per line on stderr, carrying the trace and span ids.

`setup_logging` is what `agentloop serve` calls. Every record gets the ids of the span
current when it was logged, so a log line leads to its trace. The request log (logger
`agentloop.requests`, one info line per RPC) comes from the server interceptor; what it
reports besides method, status and duration (model, tokens) is gathered on a
`RequestLog` that the generation service fills in as the RPC goes. No line carries prompt
or answer text.

The lines are written by a thread of their own (`StderrWriter`): a reader of stderr that
stalls (a full pipe, a log collector that stopped reading) must never stall the event
loop, whose health checks, calls and shutdown go on; lines past `MAX_QUEUED_LINES`
waiting are dropped and counted, and the next line written says how many.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace

REQUEST_LOGGER = "agentloop.requests"
#: Libraries that log every HTTP request at info (the MCP SDK's HTTP client): shown at
#: debug only.
CHATTY_LOGGERS = ("httpx2", "httpx", "httpcore")
#: Log lines waiting for stderr at most (a few MB): past them, new lines are dropped.
MAX_QUEUED_LINES = 10_000
#: Seconds the process waits at exit for the lines still queued to be written.
EXIT_FLUSH_SECONDS = 2.0


class JsonFormatter(logging.Formatter):
    """`{"time", "level", "logger", "message", ...fields, "trace_id", "span_id"}` per line."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self._worker is not None:
            entry["worker"] = self._worker
        entry.update(getattr(record, "fields", ()))
        if "trace_id" not in entry:
            span = trace.get_current_span().get_span_context()
            if span.is_valid:
                entry["trace_id"] = trace.format_trace_id(span.trace_id)
                entry["span_id"] = trace.format_span_id(span.span_id)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class StderrWriter(logging.Handler):
    """Formats each record where it is logged (its span is current there) and queues the
    line; a daemon thread writes the queue to the file descriptor. A full queue drops the
    line (counted) instead of waiting: logging never blocks the caller."""

    def __init__(self, fd: int | None = None, capacity: int = MAX_QUEUED_LINES) -> None:
        super().__init__()
        self._fd = sys.stderr.fileno() if fd is None else fd
        self._lines: queue.Queue[bytes] = queue.Queue(capacity)
        self._dropped = 0
        threading.Thread(target=self._write_lines, name="agentloop-log-writer",
                         daemon=True).start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
        except Exception:
            self.handleError(record)
            return
        try:
            self._lines.put_nowait(line)
        except queue.Full:
            self._dropped += 1  # racy by a count at worst: only ever reported

    def _write_lines(self) -> None:
        while True:
            line = self._lines.get()
            if self._dropped:
                dropped, self._dropped = self._dropped, 0
                line = json.dumps({
                    "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                    "level": "warning", "logger": __name__,
                    "message": f"{dropped} log lines dropped: stderr was not read in time",
                }).encode() + b"\n" + line
            try:
                while line:
                    line = line[os.write(self._fd, line):]
            except OSError:
                pass  # stderr closed: nothing else can report it
            self._lines.task_done()

    def flush(self) -> None:
        """Wait a moment for the queued lines (at exit); never for a stalled reader."""
        deadline = time.monotonic() + EXIT_FLUSH_SECONDS
        with self._lines.all_tasks_done:
            while self._lines.unfinished_tasks and (left := deadline - time.monotonic()) > 0:
                self._lines.all_tasks_done.wait(left)


def setup_logging(level: str, worker: int | None = None) -> None:
    """JSON lines on stderr at `level` for the whole process (replaces other handlers),
    written by a thread of their own."""
    handler = StderrWriter()
    handler.setFormatter(JsonFormatter(worker))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if level == "debug" else logging.WARNING)


@dataclass(slots=True)
class RequestLog:
    """What one RPC's log line reports about its generations (summed over an agent run)."""

    model: str = ""
    input_tokens: int = 0
    output_tokens: int = 0


_current_request: contextvars.ContextVar[RequestLog | None] = contextvars.ContextVar(
    "agentloop_request_log", default=None)


def begin_request() -> tuple[RequestLog, contextvars.Token[RequestLog | None]]:
    """A fresh RequestLog for the RPC running in this task; reset the token at its end."""
    entry = RequestLog()
    return entry, _current_request.set(entry)


def end_request(token: contextvars.Token[RequestLog | None]) -> None:
    try:
        _current_request.reset(token)
    except ValueError:
        # A stream the client cancelled mid-send is closed later by the event loop's
        # async-generator finalizer, in another context: there is nothing to restore there.
        pass


def request_fields(method: str, status: int | str, duration: float, tenant: str,
                   entry: RequestLog, session: str, span: trace.Span) -> dict[str, Any]:
    """The fields of one request's log line, whichever door it came through: its method and
    status, duration, tenant, its generations' model and tokens, session and trace ids."""
    fields: dict[str, Any] = {"method": method, "status": status,
                              "duration_ms": round(duration * 1e3, 3), "tenant": tenant}
    if entry.model:
        fields.update(model=entry.model, input_tokens=entry.input_tokens,
                      output_tokens=entry.output_tokens)
    if session:
        fields["session"] = session
    span_context = span.get_span_context()
    if span_context.is_valid:
        fields["trace_id"] = trace.format_trace_id(span_context.trace_id)
        fields["span_id"] = trace.format_span_id(span_context.span_id)
    return fields


def current_request() -> RequestLog | None:
    """The RequestLog of the RPC this code runs for, if any."""
    return _current_request.get()
