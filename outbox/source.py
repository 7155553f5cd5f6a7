"""Where the consumer's messages come from: the `MessageSource` contract, and a `Transport` that opens one.

The consumer loop (`outbox/consumer.py`) is the same for every broker; a
source is what differs. Kafka's is `outbox.offsets.GroupOffsets` (the
default); RabbitMQ's is `outbox.rabbitmq.RabbitMQ` (`transport=` argument of
`Consumer`). Switching a service from Kafka to RabbitMQ is that one argument.

A source promises:

- `poll` returns what the broker delivered, grouped by (topic, partition)
  with each group in delivery order; one key's messages are always in one
  group (Kafka: one partition; RabbitMQ: one queue, by its routing bucket).
- `done(record)`: the record's database transaction committed; only then
  may the broker forget it (Kafka: its offset; RabbitMQ: its ack). `commit`
  sends what `done` collected; never a record that was not done.
- `give_back`: records polled but not done are delivered again by a later
  poll, before anything after them in their group.
- Outages of the broker are the source's own to wait out: a poll during one
  returns nothing, and `outage` says why in one line (None when the broker
  answers; readiness shows it). Settings the broker refuses raise `ConfigError`.
- `time_budget`: seconds one polled batch may take before it must be given
  back (Kafka: half of max.poll.interval.ms; RabbitMQ: well inside the
  connection heartbeat). `describe()`: one log line, secrets masked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from outbox.consumer_config import ConsumerConfig
from outbox.records import KafkaRecord

Batch = Mapping[Any, Sequence[KafkaRecord]]


class MessageSource(Protocol):
    @property
    def time_budget(self) -> float: ...

    def describe(self) -> str: ...

    @property
    def outage(self) -> str | None: ...

    def poll(self, timeout_ms: int, max_records: int) -> Mapping[Any, Sequence[KafkaRecord]]: ...

    def done(self, record: KafkaRecord) -> int: ...

    def commit(self) -> None: ...

    def give_back(self, batch: Batch, progress: Mapping[Any, int]) -> None: ...

    def close(self) -> None: ...


class Transport(Protocol):
    """Opens the source of one consumer group on some topics (e.g. `outbox.rabbitmq.RabbitMQ`)."""

    def open(self, *, group: str, topics: Sequence[str], config: ConsumerConfig) -> MessageSource: ...
