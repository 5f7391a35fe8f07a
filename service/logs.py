"""Logging set-up of the server process: text or JSON lines, one level for hjserve and uvicorn."""

from __future__ import annotations

import json
import logging
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


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        access = getattr(record, "access", None)
        if access:
            line += f" request_id={access['request_id']} model={access['model']} version={access['version']} " \
                    f"rows={access.get('rows', 0)} duration_ms={access['duration_ms']}"
            if access.get("queue_ms") is not None:
                line += f" queue_ms={access['queue_ms']} compute_ms={access['compute_ms']}"
            if access.get("trace_id"):
                line += f" trace_id={access['trace_id']}"
        return line


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
