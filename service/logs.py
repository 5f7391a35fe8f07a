"""Logging set-up of the server process: text or JSON lines, one level for hjserve and uvicorn."""

from __future__ import annotations

import json
import logging
import re
import time
from contextvars import ContextVar
from dataclasses import dataclass

__all__ = ["CURRENT_REQUEST", "JSONFormatter", "RequestRecord", "configure_logging"]


@dataclass
class RequestRecord:
    """What one request's access line reports beyond the transport's own view: rows answered and the
    time they spent queued and computing (filled by the dataplane's accounting)."""

    rows: int = 0
    queue_ms: float | None = None
    compute_ms: float | None = None

    def fields(self) -> dict:
        out = {"rows": self.rows}
        if self.queue_ms is not None:
            out.update(queue_ms=self.queue_ms, compute_ms=self.compute_ms)
        return out


#: The record of the request being handled (set by the transport; None outside a request).
CURRENT_REQUEST: ContextVar[RequestRecord | None] = ContextVar("hjserve_request", default=None)


class JSONFormatter(logging.Formatter):
    """One JSON object per record; access records (``extra={"access": {...}}``) add their fields."""

    def format(self, record: logging.LogRecord) -> str:
        item = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        item.update(getattr(record, "access", None) or {})
        if record.exc_info:
            item["exception"] = self.formatException(record.exc_info)
        return json.dumps(item, default=str)


#: An access field's value written bare in the text format: what names, versions, routes, request
#: ids and numbers are made of. Anything else (a client's hostile model name) is written quoted.
_BARE = re.compile(r"[A-Za-z0-9_.:{}/+-]*")


def _field(value: object) -> str:
    """``value`` as a logfmt value: bare when it is made of :data:`_BARE`'s characters, else a JSON
    string (quoted, every control and non-ASCII character escaped), so that a client's text can
    neither end the line nor forge a field."""
    text = str(value)
    return text if _BARE.fullmatch(text) else json.dumps(text)


def _printable(text: str) -> str:
    """``text`` with each character that is not printable (line breaks, terminal escapes, U+2028)
    written as its backslash escape."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class _TextFormatter(logging.Formatter):
    """One line per record (a traceback follows on lines of its own): a message's unprintable
    characters are escaped, and an access record's fields are written as logfmt (:func:`_field`),
    since both may hold what a client sent."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = _printable(record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        access = getattr(record, "access", None)
        if access:
            fields = {"request_id": access["request_id"], "model": access["model"], "version": access["version"],
                      "rows": access.get("rows", 0), "duration_ms": access["duration_ms"]}
            if access.get("queue_ms") is not None:
                fields.update(queue_ms=access["queue_ms"], compute_ms=access["compute_ms"])
            if access.get("trace_id"):
                fields["trace_id"] = access["trace_id"]
            line += "".join(f" {key}={_field(value)}" for key, value in fields.items())
        return line


class _AnswerAfterTheCallEnded(logging.Filter):
    """grpc logs an ERROR with a traceback when a handler's answer cannot be sent because its call has
    already ended -- its client cancelled it, or its deadline passed, just as the handler returned
    ("ExecuteBatchError raised in core by servicer method [...]": grpcio logs it, it does not raise
    it). That is the client's doing, not a fault of the server's, and a client that sets short
    deadlines could make it one traceback in every few hundred calls: it is written as one INFO
    line without the traceback instead (and not at all below INFO). grpc fails an answer past its
    message limit the same way; the service refuses such an answer itself, before grpc sees it
    (``GRPCServer._infer``), so this record means a call that had ended."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if type(error).__name__ != "ExecuteBatchError":
            return True
        said = record.getMessage()   # "... by servicer method [/package.Service/Method]"
        method = said[said.rfind("[") + 1:-1] if said.endswith("]") else "?"
        record.msg = ("gRPC %s: the call ended before its answer was sent (its client cancelled it, its deadline "
                      "passed or its connection closed)")
        record.args, record.exc_info, record.exc_text = (method,), None, None
        record.levelno, record.levelname = logging.INFO, "INFO"
        return logging.getLogger(record.name).isEnabledFor(logging.INFO)


#: grpc's logger of its server's core errors, and the filter that makes a client's early end one line.
_GRPC_CORE_LOGGER, _ANSWER_AFTER_END = "grpc._cython.cygrpc", _AnswerAfterTheCallEnded()


def configure_logging(level: str, fmt: str) -> None:
    """Root handler on stderr for hjserve, uvicorn and libraries, at ``level`` ("trace" = debug)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JSONFormatter() if fmt == "json" else
                         _TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel("DEBUG" if level == "trace" else level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    core = logging.getLogger(_GRPC_CORE_LOGGER)
    if _ANSWER_AFTER_END not in core.filters:
        core.addFilter(_ANSWER_AFTER_END)
