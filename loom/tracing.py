"""OpenTelemetry tracing (OTLP over gRPC), off unless `--otlp-endpoint` is given.

When off, nothing from OpenTelemetry is imported and every helper here returns at once. When on:
- the router opens a span per generation request, parented to the client's W3C `traceparent` when there is one,
  and records its phases as child spans `validation`, `queue` and `inference` from the request's timings;
- the engine opens a span per request, parented to the router's request span (its `traceparent` travels in the
  AddRequest message), covering its time in the engine.
"""

from __future__ import annotations

import contextvars
import logging
import time
from typing import Any

logger = logging.getLogger(__name__)
_tracer: Any = None

# The W3C trace headers of the HTTP request being served (set by the router's middleware, read when its
# Timings are created, so request handlers need not pass headers around).
request_carrier: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("request_carrier",
                                                                                         default=None)


def setup(endpoint: str | None, service_name: str) -> None:
    global _tracer
    if not endpoint:
        return
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    insecure = not endpoint.startswith("https://")
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=insecure),
                                                   schedule_delay_millis=500))
    trace.set_tracer_provider(provider)
    _tracer = trace.get_tracer("loom")
    logger.info("exporting traces to %s as %s", endpoint, service_name)


def enabled() -> bool:
    return _tracer is not None


def shutdown() -> None:
    if _tracer is not None:
        from opentelemetry import trace

        trace.get_tracer_provider().shutdown()  # flushes pending spans


def _context_from(traceparent_carrier: dict[str, str] | None):
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract(traceparent_carrier or {})


def start_span(name: str, carrier: dict[str, str] | None = None, start: float | None = None,
               attributes: dict[str, Any] | None = None) -> Any:
    """A live span (None when tracing is off), parented to the W3C context in `carrier` if any.
    `start` is a time.monotonic() value; spans are stamped in wall-clock nanoseconds."""
    if _tracer is None:
        return None
    return _tracer.start_span(name, context=_context_from(carrier), start_time=_wall_ns(start),
                              attributes=attributes)


def carrier_of(span: Any) -> dict[str, str] | None:
    """W3C headers naming `span` as the parent, for another process."""
    if span is None:
        return None
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context=trace.set_span_in_context(span))
    return carrier


def child_span(parent: Any, name: str, start: float, end: float, attributes: dict[str, Any] | None = None) -> None:
    """Record a finished phase of `parent` from monotonic start/end times."""
    if parent is None or _tracer is None:
        return
    from opentelemetry import trace

    span = _tracer.start_span(name, context=trace.set_span_in_context(parent), start_time=_wall_ns(start),
                              attributes=attributes)
    span.end(end_time=_wall_ns(end))


def end_span(span: Any, end: float | None = None, attributes: dict[str, Any] | None = None,
             error: str | None = None) -> None:
    if span is None:
        return
    if attributes:
        span.set_attributes({k: v for k, v in attributes.items() if v is not None})
    if error is not None:
        from opentelemetry.trace import Status, StatusCode

        span.set_status(Status(StatusCode.ERROR, error))
    span.end(end_time=_wall_ns(end))


def _wall_ns(monotonic: float | None) -> int | None:
    if monotonic is None:
        return None
    return time.time_ns() - int((time.monotonic() - monotonic) * 1e9)
