"""What the RabbitMQ tests share: the broker's URL, a topology of their own, reading its queues back."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import pika
import pytest

from outbox.rabbitmq_topology import PARTITION_KEY_HEADER, Topology, declare, declare_topic
from outbox.rabbitmq_wire import connection_parameters
from tests import services


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    return services.rabbitmq_url()


@contextmanager
def channel(url: str) -> Iterator[Any]:
    connection = pika.BlockingConnection(connection_parameters(url))
    try:
        yield connection.channel()
    finally:
        if connection.is_open:
            connection.close()


class Topologies:
    """Declares topologies with unique names for one test and deletes them afterwards."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.made: list[Topology] = []
        self.exchanges: list[str] = []

    def make(self, *, group: str | None = "g", queues: int = 4, prefix: str = "rt") -> Topology:
        topic = f"{prefix}-{uuid.uuid4().hex[:10]}"
        topology = Topology(topic=topic, group=group or "none", queues=queues)
        with channel(self.url) as ch:
            if group is None:
                declare_topic(ch, topic)  # an exchange with nothing bound: unroutable
            else:
                declare(ch, topology)
                self.made.append(topology)
        self.exchanges.append(topic)
        return topology

    def delete(self) -> None:
        with channel(self.url) as ch:
            for topology in self.made:
                for queue in [*topology.queue_names, topology.dead_letter_queue]:
                    ch.queue_delete(queue)
                ch.exchange_delete(topology.group_exchange)
                ch.exchange_delete(topology.dead_letter_exchange)
            for name in self.exchanges:
                ch.exchange_delete(name)


@pytest.fixture
def topologies(rabbitmq_url: str) -> Iterator[Topologies]:
    made = Topologies(rabbitmq_url)
    yield made
    made.delete()


@dataclass(frozen=True)
class Delivered:
    queue: int
    key: str
    event_id: uuid.UUID
    properties: Any
    body: bytes


def drain_queues(url: str, topology: Topology) -> list[Delivered]:
    """Every message in the group's queues, each queue in its order (and acknowledged)."""
    out: list[Delivered] = []
    with channel(url) as ch:
        for index, queue in enumerate(topology.queue_names):
            # basic.get is refused on a single-active-consumer quorum queue: consume instead.
            count = ch.queue_declare(queue, passive=True).method.message_count
            for _ in range(count):
                method, properties, body = next(ch.consume(queue, auto_ack=True, inactivity_timeout=10))
                assert method is not None, f"{queue}: fewer messages than it counted"
                out.append(Delivered(index, properties.headers[PARTITION_KEY_HEADER], uuid.UUID(properties.message_id),
                                     properties, body))
            if count:
                ch.cancel()
    return out


def queued(url: str, topology: Topology) -> int:
    """Messages ready in the group's queues."""
    with channel(url) as ch:
        return sum(ch.queue_declare(q, passive=True).method.message_count for q in topology.queue_names)


def first_by_key(delivered: list[Delivered]) -> dict[str, list[uuid.UUID]]:
    """Per key, the event ids in the order they first arrived (a republished id counts once)."""
    seen: set[uuid.UUID] = set()
    by_key: dict[str, list[uuid.UUID]] = {}
    for d in delivered:
        if d.event_id not in seen:
            seen.add(d.event_id)
            by_key.setdefault(d.key, []).append(d.event_id)
    return by_key


def close_all_connections(url: str, *, at_least_one: bool = True) -> None:
    """`rabbitmqctl close_all_connections` in the URL's vhost: every client is cut off at once."""
    vhost = unquote(urlsplit(url).path[1:]) or "/"
    out = services.rabbitmqctl("close_all_connections", "-p", vhost, "outbox test: closed under load")
    assert not at_least_one or "Closed 0 connections" not in out, out


def rabbit_relay_env(url: str, **extra: str) -> dict[str, str]:
    return {"OUTBOX_RELAY_PUBLISHER": "rabbitmq", "OUTBOX_RABBITMQ_URL": url, **extra}
