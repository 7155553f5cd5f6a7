"""OpenTelemetry traces across the outbox, after the messaging semantic conventions.

    publish   when a span is active, a `create {topic}` PRODUCER span around the
              INSERT, in the business transaction; its context is stored with the
              row as the W3C `traceparent` / `tracestate` headers (the CloudEvents
              distributed-tracing attributes), unless the caller passed its own
              `traceparent`, which wins and works as before
    relay     one `send {topic}` PRODUCER span per topic of a round, linked to each
              message's stored creation context; the stored headers go to Kafka
              unchanged (they are the event's headers)
    consumer  a `process {topic}` CONSUMER span per message around the handler,
              parented by the creation context, so one payment is one trace from
              the span that called `publish` to the effect's commit

Attributes: `messaging.system` ("kafka"), `messaging.operation.type` /
`.name`, `messaging.destination.name`, `messaging.destination.partition.id`,
`messaging.kafka.offset`, `messaging.message.id`, `messaging.consumer.group.name`,
`messaging.batch.message_count`, and `error.type` when a handler fails.

No cost when OpenTelemetry is absent: `pip install 'outbox-kit[otel]'` adds
the API, and this module never imports it. It looks in `sys.modules` for
`opentelemetry.trace`: an application that never imported it cannot have
a tracer provider, so there is nothing to record (a dictionary lookup per
call). With the API imported but no SDK provider, or no active span at
`publish`, nothing is recorded either.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

TRACER = "outbox-kit"
TRACEPARENT, TRACESTATE = "traceparent", "tracestate"
SYSTEM = "kafka"


def _trace() -> Any | None:
    """`opentelemetry.trace` if the application imported it, else None (never imports it)."""
    return sys.modules.get("opentelemetry.trace")


def enabled() -> bool:
    """True when the application imported OpenTelemetry and set a tracer provider (an SDK's)."""
    trace = _trace()
    if trace is None:
        return False
    provider = trace.get_tracer_provider()
    return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def _propagator() -> Any:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator()


class CreateSpan:
    """What `publish` needs from its `create` span: the headers to store, and the event's id."""

    def __init__(self, headers: Mapping[str, str] | None, span: Any = None) -> None:
        self.headers = headers
        self._span = span

    def message_id(self, event_id: object) -> None:
        if self._span is not None:
            self._span.set_attribute("messaging.message.id", str(event_id))


@contextmanager
def create_span(topic: str, headers: Mapping[str, str] | None) -> Iterator[CreateSpan]:
    """Around `publish`'s INSERT: the `create {topic}` span, and `headers` with its context."""
    trace = _trace()
    if trace is None or not trace.get_current_span().get_span_context().is_valid:
        yield CreateSpan(headers)
        return
    tracer = trace.get_tracer(TRACER)
    attributes = {
        "messaging.system": SYSTEM, "messaging.operation.type": "create",
        "messaging.operation.name": "create", "messaging.destination.name": topic,
    }
    with tracer.start_as_current_span(
        f"create {topic}", kind=trace.SpanKind.PRODUCER, attributes=attributes
    ) as span:
        if headers and TRACEPARENT in headers:
            yield CreateSpan(headers, span)  # the caller's own context travels, as it always did
            return
        carrier: dict[str, str] = {}
        _propagator().inject(carrier)
        yield CreateSpan({**(headers or {}), **carrier}, span)


def send_spans(
    topics_and_headers: Sequence[tuple[str, str]], *, started: float, acknowledged: int,
) -> None:
    """After a round: one `send {topic}` span per topic, from `started` (time.time()) to now,
    linked to the creation context stored in each message's headers (JSON text)."""
    trace = _trace()
    if trace is None or not enabled():
        return
    tracer = trace.get_tracer(TRACER)
    by_topic: dict[str, list[Any]] = {}
    propagator = _propagator()
    for topic, headers in topics_and_headers:
        links = by_topic.setdefault(topic, [])
        if TRACEPARENT in headers:  # a substring test first: most rows carry no context
            context = trace.get_current_span(propagator.extract(json.loads(headers))).get_span_context()
            if context.is_valid:
                links.append(trace.Link(context))
    start_ns, end_ns = int(started * 1e9), time.time_ns()
    for topic, links in by_topic.items():
        count = sum(1 for t, _ in topics_and_headers if t == topic)
        span = tracer.start_span(
            f"send {topic}", kind=trace.SpanKind.PRODUCER, links=links, start_time=start_ns,
            attributes={
                "messaging.system": SYSTEM, "messaging.operation.type": "send",
                "messaging.operation.name": "send", "messaging.destination.name": topic,
                "messaging.batch.message_count": count,
            },
        )
        if acknowledged < len(topics_and_headers):
            span.set_attribute("error.type", "not_acknowledged")
        span.end(end_time=end_ns)


def traced_handler(
    handler: Callable[[Any, Any], object], group: str
) -> Callable[[Any, Any], object]:
    """`handler` inside a `process {topic}` CONSUMER span parented by the event's creation context."""

    @functools.wraps(handler)
    def process(session: Any, event: Any) -> object:
        trace = _trace()
        if trace is None:
            return handler(session, event)
        parent = _propagator().extract(event.headers) if TRACEPARENT in event.headers else None
        tracer = trace.get_tracer(TRACER)
        attributes = {
            "messaging.system": SYSTEM, "messaging.operation.type": "process",
            "messaging.operation.name": "process", "messaging.destination.name": event.topic,
            "messaging.destination.partition.id": str(event.partition),
            "messaging.kafka.offset": event.offset if event.offset is not None else -1,
            "messaging.message.id": str(event.id), "messaging.consumer.group.name": group,
        }
        with tracer.start_as_current_span(
            f"process {event.topic}", context=parent, kind=trace.SpanKind.CONSUMER,
            attributes=attributes, record_exception=True, set_status_on_exception=True,
        ) as span:
            try:
                return handler(session, event)
            except Exception as exc:
                span.set_attribute("error.type", type(exc).__qualname__)
                raise

    return process
