"""The RabbitMQ topology that keeps per-key order: names, and declaring it idempotently.

An event's topic T is a durable **fanout exchange `T`**. The relay publishes
each event there with `mandatory` set, so a topic that no consumer group is
bound to comes back unroutable (and is parked by the relay, like a missing
Kafka topic). Its routing key is the event's **routing bucket**,
`crc32(key) mod 64` as text (`routing_bucket`); the key itself travels as the
CloudEvents `partitionkey` attribute (`cloudEvents:partitionkey`). Each
consumer group G has its own part behind T:

    exchange T (fanout) ──▶ exchange T.G (direct) ──▶ quorum queue T.G.i  for the buckets b with b mod N = i
                                                      single active consumer, x-delivery-limit,
                                                      dead letters ──▶ T.G.dlx (fanout) ──▶ T.G.dead

- One key is always in one bucket and one bucket is bound to one queue of a
  group, and each queue has a single active consumer, so one key's events
  are applied in the order the relay published them: their commit order.
  Another consumer of the group waits on the same queues and takes over
  when the active one goes away.
- Why not the `x-consistent-hash` exchange: in RabbitMQ 3.10 its hash ring
  is rebuilt from the bindings when the node restarts, in whatever order
  they are recovered, so keys can move to other queues across a restart and
  one key's events then sit in two queues: consumed out of order (found by
  `test_rabbitmq_outage_under_load_...[broker restarted]`). Buckets bound
  by a direct exchange are durable bindings: the same after any restart.
- Quorum queues (replicated, written to disk before the publisher confirm)
  and persistent messages: a confirmed event survives a broker crash.
- `x-delivery-limit`: RabbitMQ 3.10 sets none, so a message that kills its
  consumer every time would be delivered forever. After `delivery_limit`
  returns to the queue the broker moves it to `T.G.dead` through the
  dead-letter exchange `T.G.dlx`. The kit's consumer dead-letters a failing
  message in the database long before (`max_attempts`); this limit is for
  what never reaches that point (a process that crashes on a message). A
  consumer that is stopped, killed or cut off returns its unacknowledged
  messages and so counts towards the limit: keep it well above what
  restarts can add up to (default 20).
- N (1..64 queues) is fixed per group: another N would move buckets to other
  queues, and events of a moved key could overtake each other. `declare`
  refuses a group that exists with another N; drain and delete it first.

`declare` is idempotent: declaring what exists with the same arguments
changes nothing. Different arguments (another delivery limit) are refused by
the broker with PRECONDITION_FAILED, reported as a ConfigError naming the queue.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from outbox.errors import ConfigError

ROUTING_BUCKETS = 64  # routing keys "0".."63"; a group has 1..64 queues
PARTITION_KEY_HEADER = "cloudEvents:partitionkey"  # the CloudEvents partitioning extension
DEFAULT_QUEUES = 4
DEFAULT_DELIVERY_LIMIT = 20


@dataclass(frozen=True, kw_only=True, slots=True)
class Topology:
    """The names and arguments of one consumer group's part of one topic."""

    topic: str
    group: str
    queues: int = DEFAULT_QUEUES
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT

    def __post_init__(self) -> None:
        if not self.topic or not self.group:
            raise ConfigError("topic", "topic and group must both be non-empty")
        if not 1 <= self.queues <= ROUTING_BUCKETS:
            raise ConfigError("queues", f"{self.queues} is out of range 1..{ROUTING_BUCKETS}")
        if not 1 <= self.delivery_limit <= 1_000_000:
            raise ConfigError("delivery_limit", f"{self.delivery_limit} is out of range 1..1000000")

    @property
    def exchange(self) -> str:
        """Where the relay publishes: the topic itself."""
        return self.topic

    @property
    def group_exchange(self) -> str:
        return f"{self.topic}.{self.group}"

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.topic}.{self.group}.dlx"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.topic}.{self.group}.dead"

    def queue(self, index: int) -> str:
        return f"{self.topic}.{self.group}.{index}"

    @property
    def queue_names(self) -> list[str]:
        return [self.queue(i) for i in range(self.queues)]

    def queue_arguments(self) -> dict[str, Any]:
        return {
            "x-queue-type": "quorum",
            "x-single-active-consumer": True,
            "x-delivery-limit": self.delivery_limit,
            "x-dead-letter-exchange": self.dead_letter_exchange,
        }


def routing_bucket(key: bytes) -> str:
    """The routing key of an event with this key: the same bucket for the same key, always."""
    return str(zlib.crc32(key) % ROUTING_BUCKETS)


def declare_topic(channel: Any, topic: str) -> None:
    """The topic's own exchange (what the relay needs), on a pika BlockingChannel."""
    channel.exchange_declare(exchange=topic, exchange_type="fanout", durable=True)


def declare(channel: Any, topology: Topology) -> None:
    """Declare `topology` on a pika BlockingChannel; idempotent (see the module docstring).

    A broker refusal (different arguments, the plugin not enabled) is a
    ConfigError; the channel is closed by the broker then.
    """
    import pika.exceptions as pe

    _refuse_another_queue_count(channel.connection, topology)
    step = f"exchange {topology.exchange}"
    try:
        declare_topic(channel, topology.topic)
        step = f"exchange {topology.group_exchange}"
        channel.exchange_declare(exchange=topology.group_exchange, exchange_type="direct", durable=True)
        channel.exchange_bind(destination=topology.group_exchange, source=topology.exchange,
                              routing_key="")
        step = f"exchange {topology.dead_letter_exchange}"
        channel.exchange_declare(exchange=topology.dead_letter_exchange, exchange_type="fanout",
                                 durable=True)
        step = f"queue {topology.dead_letter_queue}"
        channel.queue_declare(queue=topology.dead_letter_queue, durable=True,
                              arguments={"x-queue-type": "quorum"})
        channel.queue_bind(queue=topology.dead_letter_queue, exchange=topology.dead_letter_exchange,
                           routing_key="")
        for name in topology.queue_names:
            step = f"queue {name}"
            channel.queue_declare(queue=name, durable=True, arguments=topology.queue_arguments())
        for bucket in range(ROUTING_BUCKETS):
            channel.queue_bind(queue=topology.queue(bucket % topology.queues),
                               exchange=topology.group_exchange, routing_key=str(bucket))
    except pe.ChannelClosedByBroker as exc:
        raise ConfigError("rabbitmq", f"the broker refused {step}: {exc.reply_text}") from None
    except pe.ConnectionClosedByBroker as exc:
        raise ConfigError("rabbitmq", f"the broker closed the connection at {step}: {exc.reply_text}"
                          ) from None


def _refuse_another_queue_count(connection: Any, topology: Topology) -> None:
    """A group declared before with another N would get each bucket bound twice: refuse it."""
    if not _queue_exists(connection, topology.queue(0)):
        return  # a new group
    if _queue_exists(connection, topology.queue(topology.queues)) or not _queue_exists(
        connection, topology.queue(topology.queues - 1)
    ):
        raise ConfigError("queues", (
            f"group {topology.group} of topic {topology.topic} exists with another number of queues "
            f"than {topology.queues}; another count would move keys between queues and break their order: "
            "keep the count, or drain the group's queues and delete them first"))


def _queue_exists(connection: Any, name: str) -> bool:
    """A passive declare on a channel of its own (a miss closes that channel)."""
    import pika.exceptions as pe

    channel = connection.channel()
    try:
        channel.queue_declare(queue=name, passive=True)
    except pe.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            return False
        raise
    channel.close()
    return True


def declare_all(channel: Any, topics: Sequence[str], group: str, *, queues: int,
                delivery_limit: int) -> list[Topology]:
    """`declare` for each of `topics` for one group; returns what was declared."""
    declared = []
    for topic in topics:
        topology = Topology(topic=topic, group=group, queues=queues, delivery_limit=delivery_limit)
        declare(channel, topology)
        declared.append(topology)
    return declared


def declare_command(args: Any) -> int:
    """`outbox rabbitmq declare`: the topics' exchanges and, with --group, the group's queues."""
    import pika

    from outbox.errors import OutboxError
    from outbox.rabbitmq_wire import connection_parameters, rabbitmq_url, refusal

    if getattr(args, "log_level", "WARNING") != "DEBUG":
        # pika logs every failed connection step with a traceback; the one line below says it.
        logging.getLogger("pika").setLevel(logging.CRITICAL)
    url = rabbitmq_url()
    try:
        connection = pika.BlockingConnection(connection_parameters(url))
    except Exception as exc:
        problem = refusal(exc, url)
        if problem is not None:
            raise problem from None
        from outbox.config import safe_url

        raise OutboxError(f"RabbitMQ at {safe_url(url)} not reachable: {type(exc).__name__}") from None
    try:
        channel = connection.channel()
        for topic in args.topic:
            if args.group is None:
                declare_topic(channel, topic)
                print(f"outbox: exchange {topic} (fanout, durable)")
                continue
            topology = Topology(topic=topic, group=args.group, queues=args.queues,
                                delivery_limit=args.delivery_limit)
            declare(channel, topology)
            print(f"outbox: exchange {topology.exchange} -> {topology.group_exchange} ({ROUTING_BUCKETS} buckets) "
                  f"-> {topology.queues} quorum queues {topology.queue(0)}..{topology.queue(topology.queues - 1)} "
                  f"(single active consumer, delivery limit {topology.delivery_limit}, dead letters "
                  f"to {topology.dead_letter_queue})")
    finally:
        if connection.is_open:
            connection.close()
    return 0
