"""One trace per payment, with the real OpenTelemetry SDK, against the real PostgreSQL and Kafka:
the HTTP-side span that called `publish` -> `create {topic}` (stored with the row) -> the
relay's `send {topic}` (linked) -> the consumer's `process {topic}` around the handler."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from sqlalchemy import Engine
from sqlalchemy.orm import Session

import outbox
from outbox.consumer import Consumer
from outbox.event import Event
from tests.integration.test_consumer import FAST_CONFIG, FAST_KAFKA, drain, handled
from tests.integration.test_relay import _config
from tests.kafka_helpers import read_topic, relay_thread, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # once per process: the global provider is set-once
    yield exporter
    exporter.clear()


def _named(finished: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in finished if s.name == name]


def test_one_trace_from_the_http_span_to_the_ledger_effect(
    spans: InMemorySpanExporter, clean_db: Engine, database_url: str, bootstrap_servers: str,
    topic: str, group: str,
) -> None:
    spans.clear()
    tracer = trace.get_tracer("payments-api")
    with tracer.start_as_current_span("POST /payments", kind=SpanKind.SERVER) as http, Session(clean_db) as session:
        payment = outbox.publish(session, topic=topic, key="pay-1", type="payment.captured",
                                 data={"amount_minor": 1250})
        session.commit()
    http_trace = http.get_span_context().trace_id
    # A caller's own traceparent keeps working as before: it is the one stored and sent.
    theirs = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with Session(clean_db) as session:
        own = outbox.publish(session, topic=topic, key="pay-2", type="payment.captured",
                             data={"amount_minor": 99}, headers={"traceparent": theirs})
        session.commit()
    assert own.headers["traceparent"] == theirs
    stored = payment.headers["traceparent"]

    effects: dict[uuid.UUID, dict[str, Any]] = {}
    failed_once: set[uuid.UUID] = set()

    def ledger(session: Session, event: Event) -> None:
        if event.id == payment.id and event.id not in failed_once:
            failed_once.add(event.id)
            raise ValueError("ledger briefly unavailable")  # a retry: error.type on its span
        current = trace.get_current_span().get_span_context()
        effects[event.id] = {"trace_id": current.trace_id, "traceparent": event.headers.get("traceparent")}

    with relay_thread(_config(database_url, bootstrap_servers)) as relay:
        wait_until(lambda: relay.published == 2, timeout=30, what="both events published")
    received = {r.event_id: r for r in read_topic(bootstrap_servers, topic, expect=2)}
    assert received[payment.id].headers["traceparent"].decode() == stored  # forwarded unchanged
    assert received[own.id].headers["traceparent"].decode() == theirs

    consumer = Consumer(clean_db, group=group, topics=[topic], handler=ledger,
                        bootstrap_servers=bootstrap_servers, config=FAST_CONFIG, **FAST_KAFKA)
    try:
        drain(consumer, lambda: handled(consumer) == 2)
    finally:
        consumer.close()

    finished = spans.get_finished_spans()
    [create] = [s for s in _named(finished, f"create {topic}")
                if s.attributes and s.attributes.get("messaging.message.id") == str(payment.id)]
    assert create.kind is SpanKind.PRODUCER and create.context.trace_id == http_trace
    assert create.parent is not None and create.parent.span_id == http.get_span_context().span_id
    assert f"{create.context.span_id:016x}" in stored  # the row carries the create span's context
    assert create.attributes["messaging.destination.name"] == topic

    sends = _named(finished, f"send {topic}")
    assert sends and all(s.kind is SpanKind.PRODUCER for s in sends)
    linked = {link.context.span_id for s in sends for link in s.links}
    assert create.context.span_id in linked

    processes = [s for s in _named(finished, f"process {topic}")
                 if s.attributes and s.attributes.get("messaging.message.id") == str(payment.id)]
    assert processes and all(s.kind is SpanKind.CONSUMER for s in processes)
    assert {s.context.trace_id for s in processes} == {http_trace}  # one trace per payment
    assert all(s.parent is not None and s.parent.span_id == create.context.span_id for s in processes)
    errors = [s for s in processes if s.attributes and "error.type" in s.attributes]
    assert [s.attributes["error.type"] for s in errors if s.attributes] == ["ValueError"]
    ok = next(s for s in processes if s.attributes and "error.type" not in s.attributes)
    assert ok.attributes is not None
    assert {k: ok.attributes[k] for k in (
        "messaging.system", "messaging.destination.name", "messaging.consumer.group.name",
        "messaging.operation.type",
    )} == {"messaging.system": "kafka", "messaging.destination.name": topic,
           "messaging.consumer.group.name": group, "messaging.operation.type": "process"}
    assert ok.attributes["messaging.destination.partition.id"] == str(received[payment.id].partition)
    assert ok.attributes["messaging.kafka.offset"] == received[payment.id].offset

    # The ledger's effect ran inside that trace; the caller-supplied context is honoured too.
    assert effects[payment.id]["trace_id"] == http_trace
    assert effects[own.id]["trace_id"] == int(theirs.split("-")[1], 16)
