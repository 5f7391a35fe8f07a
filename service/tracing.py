"""Optional OpenTelemetry tracing (``pip install 'hjserve[tracing]'``; setting ``tracing``).

One server span per request -- ``HTTP <method> <route>`` or ``gRPC <Method>`` -- continuing the
caller's trace when it sends W3C ``traceparent`` (header or gRPC metadata), with child spans
``decode``, ``queue``, ``compute`` and ``encode``. Queue and compute happen in the model version's
batcher, shared by the requests of one batch; their spans are recorded on each request from the
batch's measured times. The trace id is written on the request's access-log line and returned in
the ``X-Trace-ID`` header (gRPC: ``x-trace-id`` trailing metadata).

Off by default; when off, or when OpenTelemetry is not installed, every function here is a cheap
no-op. Modes: ``on`` uses the process's tracer provider (set by the host, by
``opentelemetry-instrument`` or by a test); ``otlp`` installs the SDK with the OTLP/HTTP exporter
(configured by the standard ``OTEL_EXPORTER_OTLP_*`` variables); ``console`` prints spans.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["configure", "enabled", "record", "server_span", "span", "trace_id"]

_tracer = None


def configure(mode: str) -> None:
    """Enable tracing in ``mode`` (off | on | otlp | console) for this process."""
    global _tracer
    if mode == "off":
        _tracer = None
        return
    try:
        from opentelemetry import trace
    except ImportError as exc:
        raise RuntimeError("tracing needs OpenTelemetry: pip install 'hjserve[tracing]'") from exc
    if mode in ("otlp", "console"):
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

        if mode == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        else:
            exporter = ConsoleSpanExporter()
        provider = TracerProvider(resource=Resource.create({"service.name": "hjserve"}))
        provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
    _tracer = trace.get_tracer("hjserve")


def enabled() -> bool:
    return _tracer is not None


@contextlib.contextmanager
def server_span(name: str, carrier: Mapping[str, str], **attributes: Any) -> Iterator[Any]:
    """The request's root span (kind SERVER), continuing the trace in ``carrier`` (headers or
    metadata, lower-case keys); None when tracing is off."""
    if _tracer is None:
        yield None
        return
    from opentelemetry import propagate, trace

    context = propagate.extract(dict(carrier))
    with _tracer.start_as_current_span(name, context=context, kind=trace.SpanKind.SERVER,
                                       attributes=_clean(attributes)) as current:
        yield current


@contextlib.contextmanager
def span(name: str, **attributes: Any) -> Iterator[Any]:
    """A child span of the current one (a no-op when tracing is off)."""
    if _tracer is None:
        yield None
        return
    with _tracer.start_as_current_span(name, attributes=_clean(attributes)) as current:
        yield current


def record(*spans: tuple[str, float, float, Mapping[str, Any]]) -> None:
    """Finished child spans ``(name, start_s, end_s, attributes)`` from measured
    ``time.perf_counter()`` instants (queue and compute in the batcher, which serves several requests
    at once). One conversion to the wall clock for all of them: two readings of the two clocks differ
    by however long the thread was held between them, which could put one span's end after the next
    one's start."""
    if _tracer is None:
        return
    offset = time.time_ns() - int(time.perf_counter() * 1e9)   # perf_counter -> wall clock
    for name, start_s, end_s, attributes in spans:
        current = _tracer.start_span(name, start_time=offset + int(start_s * 1e9), attributes=_clean(attributes))
        current.end(end_time=offset + int(end_s * 1e9))


def trace_id() -> str | None:
    """The current trace id (32 hex digits), or None."""
    if _tracer is None:
        return None
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


def _clean(attributes: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in attributes.items() if v is not None}
