"""OpenTelemetry traces of jobs (optional: ``pip install 'rerankq[tracing]'``).

A job's trace runs from the producer's send to its result. The producer publishes inside a ``rerankq send``
span, a child of whatever span the caller is in (its web request's, say), and carries that span's context
in the message headers (W3C ``traceparent``); ``rerankq serve`` joins the trace of an HTTP request that
carries one. The worker, as it settles the job, records ``rerankq job`` under it, from the publish to the
job's settling, with ``rerankq queue wait`` (publish to first forward
batch) and ``rerankq inference`` (first forward batch to last pair) inside. Their times are the two hosts'
clocks: the queue wait is as right as their agreement.

rerankq uses only the API: spans go wherever the process's tracer provider sends them, and with none set up
(or opentelemetry not installed) nothing is recorded and nothing is added to messages. ``rerankq worker``
and ``rerankq serve`` set one up from ``RERANKQ_TRACING``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from rerankq.tasks.errors import ConfigError
from rerankq.tasks.records import BatchInfo

logger = logging.getLogger(__name__)

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
except ImportError:  # the optional extra is not installed: tracing is off
    trace = None  # type: ignore[assignment]
except Exception as exc:  # e.g. OTEL_PROPAGATORS naming one not installed: never a reason not to serve
    logger.warning("OpenTelemetry did not load (%r): tracing is off", exc)
    trace = None  # type: ignore[assignment]


def enabled() -> bool:
    """Whether this process has a tracer provider set up (the API's own default records nothing)."""
    return trace is not None and not isinstance(trace.get_tracer_provider(),
                                                trace.ProxyTracerProvider | trace.NoOpTracerProvider)


@contextlib.contextmanager
def joined(headers: Mapping[str, str]) -> Iterator[None]:
    """Within it, sends belong to the trace in ``headers`` (an HTTP request's ``traceparent``)."""
    if not enabled():
        yield
        return
    token = otel_context.attach(propagate.extract(dict(headers)))
    try:
        yield
    finally:
        otel_context.detach(token)


def sending(headers: dict[str, Any], task_id: str, queue: str) -> None:
    """Record the send and put its context in the message ``headers``, as the job is published."""
    if not enabled():
        return
    span = trace.get_tracer("rerankq").start_span("rerankq send", kind=SpanKind.PRODUCER, attributes={
        "messaging.system": "redis", "messaging.operation.type": "send", "messaging.message.id": task_id,
        "messaging.destination.name": queue})
    propagate.inject(headers, context=trace.set_span_in_context(span))
    span.end()


def settled(headers: Mapping[str, Any], task_id: str, attributes: Mapping[str, Any], sent_at: float,
            started: float | None, done: float, batches: Sequence[BatchInfo], error: BaseException | None) -> None:
    """Record a settled job under the send in its ``headers`` (times are Unix seconds)."""
    if not enabled():
        return
    tracer = trace.get_tracer("rerankq")
    begun = started if started is not None else done
    sent_at = min(sent_at, begun)  # two hosts' clocks: a skew never makes a wait negative
    job = tracer.start_span("rerankq job", context=propagate.extract(dict(headers)), kind=SpanKind.CONSUMER,
                            start_time=_ns(sent_at), attributes={"messaging.message.id": task_id, **attributes})
    inside = trace.set_span_in_context(job)
    tracer.start_span("rerankq queue wait", context=inside, start_time=_ns(sent_at)).end(end_time=_ns(begun))
    if batches:
        inference = tracer.start_span("rerankq inference", context=inside, start_time=_ns(begun), attributes={
            "rerankq.forward_batches": [b.id for b in batches],
            "rerankq.padded_tokens": sum(b.padded_tokens for b in batches)})
        inference.end(end_time=_ns(done))
    if error is not None:
        job.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
    job.end(end_time=_ns(done))


def setup(exporter: str, service: str) -> None:
    """Set up this process's tracer provider: ``otlp`` (the OTLP/HTTP exporter, configured by the standard
    ``OTEL_EXPORTER_OTLP_*`` variables), ``console`` (one JSON line per span on stderr), or nothing."""
    if not exporter:
        return
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor
    except ImportError:
        raise ConfigError(f"RERANKQ_TRACING={exporter} needs OpenTelemetry: pip install 'rerankq[tracing]'") from None
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    if exporter == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(
            out=sys.stderr, formatter=lambda span: span.to_json(indent=None) + "\n")))
    else:
        # Short timeouts: a collector that is away never holds a worker's exit past its stop grace.
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(timeout=5), export_timeout_millis=5000))
    trace.set_tracer_provider(provider)


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)
