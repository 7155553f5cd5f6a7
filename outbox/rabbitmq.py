"""The consumer over RabbitMQ: `Consumer(..., transport=RabbitMQ())`, the same handler contract as Kafka.

    consumer = Consumer(engine, group="ledger", topics=["payments"], handler=apply_payment,
                        transport=RabbitMQ())          # the one line that differs from Kafka

`RabbitMQ` opens a `RabbitMQSource` (an `outbox.source.MessageSource`) for
the group: it declares the group's part of each topic's topology
(`outbox.rabbitmq_topology`, idempotent; `declare=False` if your
operations declare it) and consumes the group's N quorum queues on one
channel, with manual acknowledgements and a prefetch per queue. Every
consumer of the group subscribes to every queue; each queue has a single
active consumer, so one key's events (always in one queue) are applied in
order, and when the active consumer goes away another one takes its queues
and starts at the first message not acknowledged.

How the consumer's guarantees map onto RabbitMQ:

- A message is acknowledged (`done` then `commit`) only after the database
  transaction that applied it (or dead-lettered it) committed. A crash
  before the ack returns it to its queue; the next delivery finds its
  event id in the inbox and is skipped: applied once.
- `give_back` (stop(), the batch's time budget) does not nack: the
  messages stay delivered to this consumer, unacknowledged, and the next
  poll hands them out again first. So a database outage adds nothing to a
  message's delivery count, and the queue's `x-delivery-limit` is never
  spent on it.
- Memory: at most `prefetch` unacknowledged messages per queue (default:
  the consumer's `poll_batch_size`), so queues x prefetch in all.
- Broker outages (stopped, restarted, connections closed by the server, a
  consumer cancelled): the channel's unacknowledged messages go back to the
  queue; the source reconnects with backoff, one WARNING when it starts and
  one INFO when it ends; messages whose transaction committed but whose ack
  was lost come again and are skipped by the inbox. A refused login or
  vhost is a ConfigError (one line, no secret).
- Malformed messages and handlers that keep failing are dead-lettered in
  the database (`outbox_dead_letter`) as on Kafka, and replayed the same
  way. A record's `partition` is its queue's index and its `offset` a
  stable 63-bit hash of the message (RabbitMQ has no offsets), so a
  message delivered again is not parked twice.

Settings (arguments win over variables): `url` / `OUTBOX_RABBITMQ_URL`,
`queues` / `OUTBOX_RABBITMQ_QUEUES` (4), `delivery_limit` /
`OUTBOX_RABBITMQ_DELIVERY_LIMIT` (20), `prefetch` / `OUTBOX_RABBITMQ_PREFETCH`
(poll_batch_size). pika is imported when a source connects, not before.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kafka.structs import TopicPartition

from outbox.backoff import backoff_delay
from outbox.config import env_bool, env_int, safe_url
from outbox.consumer_config import ConsumerConfig
from outbox.errors import ConfigError, describe_error
from outbox.rabbitmq_topology import (
    DEFAULT_DELIVERY_LIMIT,
    DEFAULT_QUEUES,
    PARTITION_KEY_HEADER,
    Topology,
    declare,
)
from outbox.rabbitmq_wire import connection_parameters, from_amqp, rabbitmq_url, refusal
from outbox.records import KafkaRecord

__all__ = ["RabbitMQ", "RabbitMQRecord", "RabbitMQSource"]

log = logging.getLogger("outbox.consumer")  # the consumer's log lines, under its name

# Well inside the connection heartbeat (outbox.rabbitmq_wire: 300 s unless the
# URL says otherwise): a blocking client answers heartbeats only between polls.
TIME_BUDGET = 120.0
# Reconnect waits grow to this: a broker that is back should not wait for the
# consumer long (the relay's own default is 10 s; a poll lasts about 1 s).
RECONNECT_BACKOFF_MAX = 5.0


@dataclass(frozen=True, slots=True)
class RabbitMQRecord:
    """One delivered message in the shape the consumer reads (`outbox.records.KafkaRecord`)."""

    topic: str
    partition: int  # the index of its queue among the group's
    offset: int  # a stable hash of the message: the dead letters' key
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    delivery_tag: int
    generation: int  # which connection delivered it: an ack goes only to that one
    redelivered: bool


def message_offset(message_id: str | None, body: bytes, headers: Sequence[tuple[str, bytes]]) -> int:
    """The same 63-bit number every time the same message is delivered."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update((message_id or "").encode())
    for name, value in headers:
        digest.update(name.encode() + b"\0" + value + b"\0")
    digest.update(body)
    return int.from_bytes(digest.digest(), "big") >> 1


class RabbitMQ:
    """The RabbitMQ transport for `outbox.Consumer` (see the module docstring)."""

    def __init__(
        self, url: str | None = None, *, queues: int | None = None, delivery_limit: int | None = None,
        prefetch: int | None = None, declare: bool | None = None,
    ) -> None:
        self.url = rabbitmq_url(url)
        self.queues = queues or env_int("OUTBOX_RABBITMQ_QUEUES", DEFAULT_QUEUES, minimum=1)
        self.delivery_limit = delivery_limit or env_int(
            "OUTBOX_RABBITMQ_DELIVERY_LIMIT", DEFAULT_DELIVERY_LIMIT, minimum=1)
        self.prefetch = prefetch or env_int("OUTBOX_RABBITMQ_PREFETCH", 0, minimum=0) or None
        self.declare = declare if declare is not None else env_bool("OUTBOX_RABBITMQ_DECLARE", True)
        if self.prefetch is not None and not 1 <= self.prefetch <= 65535:
            raise ConfigError("prefetch", f"{self.prefetch} is out of range 1..65535")

    def open(self, *, group: str, topics: Sequence[str], config: ConsumerConfig) -> RabbitMQSource:
        topologies = [Topology(topic=t, group=group, queues=self.queues,
                               delivery_limit=self.delivery_limit) for t in topics]
        return RabbitMQSource(self.url, topologies, prefetch=self.prefetch or config.poll_batch_size,
                              declare=self.declare)


class RabbitMQSource:
    """One consumer's channel on its group's queues; an `outbox.source.MessageSource`. Not thread-safe."""

    time_budget = TIME_BUDGET

    def __init__(self, url: str, topologies: Sequence[Topology], *, prefetch: int, declare: bool,
                 backoff_max: float = RECONNECT_BACKOFF_MAX) -> None:
        self._url = url
        self._topologies = list(topologies)
        self._prefetch = prefetch
        self._declare = declare
        self._backoff_max = backoff_max
        self._connection: Any = None
        self._channel: Any = None
        self._generation = 0
        self._buffer: deque[RabbitMQRecord] = deque()  # delivered, not yet handed out
        self._done: list[RabbitMQRecord] = []  # handled, ack not yet sent
        self._outstanding: set[int] = set()  # delivery tags of this channel not yet acked
        self._queues = {t.queue(i): (t.topic, i) for t in self._topologies for i in range(t.queues)}
        self._outage_started: float | None = None
        self._outage: str | None = None
        self._failures = 0
        self._retry_at = 0.0

    def describe(self) -> str:
        return (f"rabbitmq={safe_url(self._url)} queues={len(self._queues)} prefetch={self._prefetch} "
                f"per queue")

    # -- the MessageSource contract ---------------------------------------------

    @property
    def outage(self) -> str | None:
        """Why the broker is being waited out (one line), or None."""
        return self._outage

    def poll(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[RabbitMQRecord]]:
        import pika.exceptions as pe

        self.commit()
        deadline = time.monotonic() + timeout_ms / 1000
        try:
            if not self._connected(deadline):
                return {}
            while len(self._buffer) < max_records:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._connection.process_data_events(time_limit=0 if self._buffer else remaining)
                if self._buffer:  # what arrived together, without waiting for more
                    self._connection.process_data_events(time_limit=0)
                    break
        except (pe.AMQPError, OSError) as exc:
            self._lost(exc)
            return {}
        self._recovered()
        batch: dict[TopicPartition, list[RabbitMQRecord]] = {}
        for _ in range(min(max_records, len(self._buffer))):
            record = self._buffer.popleft()
            batch.setdefault(TopicPartition(record.topic, record.partition), []).append(record)
        return batch

    def done(self, record: KafkaRecord) -> int:
        if isinstance(record, RabbitMQRecord) and record.generation == self._generation:
            self._done.append(record)
        return record.offset + 1

    def commit(self) -> None:
        """Acknowledge what `done` collected, on the channel that delivered it."""
        import pika.exceptions as pe

        done, self._done = self._done, []
        if not done or self._channel is None:
            return
        tags = {r.delivery_tag for r in done if r.generation == self._generation}
        if not tags:
            return
        highest = max(tags)
        below = {t for t in self._outstanding if t <= highest}
        try:
            if below <= tags:  # everything delivered up to `highest` is done: one frame acks it all
                self._channel.basic_ack(delivery_tag=highest, multiple=True)
            else:
                for tag in sorted(tags):
                    self._channel.basic_ack(delivery_tag=tag)
            self._outstanding -= tags
        except (pe.AMQPError, OSError) as exc:
            # Those messages come again and the inbox skips them: nothing lost, nothing twice.
            self._lost(exc)

    def give_back(self, batch: Mapping[Any, Sequence[KafkaRecord]], progress: Mapping[Any, int]) -> None:
        """Keep the records not done for the next poll, in order, still unacknowledged (no nack)."""
        done = {r.delivery_tag for r in self._done}
        back = [r for records in batch.values() for r in records
                if isinstance(r, RabbitMQRecord) and r.generation == self._generation
                and r.delivery_tag not in done]
        back.sort(key=lambda r: r.delivery_tag)
        self._buffer.extendleft(reversed(back))

    def close(self) -> None:
        """Acknowledge what is done and close; what is not done returns to its queue."""
        try:
            self.commit()
        finally:
            self._drop()

    # -- the connection ------------------------------------------------------------

    def _connected(self, deadline: float) -> bool:
        if self._channel is not None and self._channel.is_open:
            return True
        self._drop()
        now = time.monotonic()
        if now < self._retry_at:
            time.sleep(max(0.0, min(self._retry_at, deadline) - now))
            if time.monotonic() < self._retry_at:
                return False
        import pika

        try:
            connection = pika.BlockingConnection(connection_parameters(self._url))
        except Exception as exc:
            problem = refusal(exc, self._url)
            if problem is not None:
                raise problem from None
            self._lost(exc)
            return False
        try:
            channel = connection.channel()
            channel.basic_qos(prefetch_count=self._prefetch)
            if self._declare:
                for topology in self._topologies:
                    declare(channel, topology)
            self._generation += 1
            generation = self._generation
            for queue, (topic, index) in self._queues.items():
                channel.basic_consume(
                    queue=queue, auto_ack=False,
                    on_message_callback=self._receiver(topic, index, generation),
                )
            channel.add_on_cancel_callback(self._cancelled)
        except ConfigError:
            _close_quietly(connection)
            raise
        except Exception as exc:
            _close_quietly(connection)
            if _is_missing_queue(exc):
                raise ConfigError("rabbitmq", (
                    f"a queue of {', '.join(t.group_exchange for t in self._topologies)} does not exist "
                    "and declare=False; run: outbox rabbitmq declare --topic T --group G --queues N"
                )) from None
            self._lost(exc)
            return False
        self._connection, self._channel = connection, channel
        return True

    def _receiver(self, topic: str, index: int, generation: int) -> Any:
        def received(channel: Any, method: Any, properties: Any, body: bytes) -> None:
            headers = from_amqp(properties.content_type, properties.headers)
            key = (properties.headers or {}).get(PARTITION_KEY_HEADER)
            self._outstanding.add(method.delivery_tag)
            self._buffer.append(RabbitMQRecord(
                topic=topic, partition=index, offset=message_offset(properties.message_id, body, headers),
                key=key.encode() if isinstance(key, str) else key if isinstance(key, bytes) else None,
                value=body,
                headers=headers, delivery_tag=method.delivery_tag, generation=generation,
                redelivered=bool(method.redelivered),
            ))
        return received

    def _cancelled(self, frame: Any) -> None:
        # The broker cancelled a consumer (its queue deleted, or its leader moved):
        # start over on a new channel, whose unacknowledged messages come back.
        log.warning("rabbitmq cancelled the consumer of a queue; reconnecting")
        channel = self._channel
        self._channel = None
        if channel is not None:
            _close_quietly(channel)

    def _lost(self, exc: BaseException) -> None:
        """The connection is gone: forget its deliveries (the broker redelivers them); back off."""
        self._drop()
        self._failures += 1
        self._retry_at = time.monotonic() + self._backoff_delay()
        self._outage = f"waiting for the broker: {describe_error(exc)}"
        if self._outage_started is None:
            self._outage_started = time.monotonic()
            log.warning("rabbitmq unavailable, reconnecting with backoff; unacknowledged messages "
                        "return to their queues and are deduplicated by the inbox: %s reason=%s",
                        safe_url(self._url), describe_error(exc))
        else:
            log.debug("rabbitmq still unavailable: %s", describe_error(exc))

    def _backoff_delay(self) -> float:
        """The kit's one outage curve (`outbox.backoff`), at this outage's attempt number."""
        return backoff_delay(0.2, self._backoff_max, self._failures)

    def _recovered(self) -> None:
        if self._outage_started is not None:
            log.info("rabbitmq available again after %.1fs", time.monotonic() - self._outage_started)
            self._outage_started = None
        self._outage = None
        self._failures = 0

    def _drop(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        self._buffer.clear()
        self._done.clear()
        self._outstanding.clear()
        if connection is not None:
            _close_quietly(connection)


def _close_quietly(closable: Any) -> None:
    try:
        if closable.is_open:
            closable.close()
    except Exception:  # closing a broken connection must not hide the real error
        log.debug("error while closing a RabbitMQ connection", exc_info=True)


def _is_missing_queue(exc: BaseException) -> bool:
    import pika.exceptions as pe

    return isinstance(exc, pe.ChannelClosedByBroker) and exc.reply_code == 404
