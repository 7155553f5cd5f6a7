"""RabbitMQ: the relay against raw pika publishers, the consumer against a raw pika consumer, one run.

    python -m bench.rabbitmq_throughput --database-url URL [--rabbitmq-url URL] [--events N]

On topics with two consumer groups' queues behind each (4 quorum queues
per group, the kit's topology; the consumers read the relay's topic, the raw
publishers write to a second one):

- raw pika, blocking: `BlockingConnection` with `confirm_delivery()`, the
  seed's way: each publish waits for its confirm;
- raw pika, pipelined: `SelectConnection`, a window of 500 publishes, then
  their confirms (what the relay's publisher does, without the outbox);
- the relay: a backlog of N events drained by `Relay.run_once()` with
  `OUTBOX_RELAY_PUBLISHER=rabbitmq` (batch 500: fetch, publish, confirms, delete);
- raw pika consumer: the group's queues, prefetch 100 per queue, the same
  one-row INSERT per message in transactions of 50 messages, acked
  (`multiple`) after each commit, no deduplication;
- the kit's consumer: `Consumer(..., transport=RabbitMQ())`, the same INSERT
  as its handler, inbox and acks after commit.

The benchmark empties the kit's tables: give it a database of its own. It
writes bench/results/rabbitmq.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pika
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from bench.consumer_throughput import _DDL, _INSERT, EFFECT_TABLE, record_effect
from bench.env import BenchEnv
from bench.relay_throughput import drain_with_relay, sample_messages
from outbox.config import database_url as resolve_database_url
from outbox.consumer import Consumer, ConsumerConfig
from outbox.rabbitmq import RabbitMQ
from outbox.rabbitmq_topology import PARTITION_KEY_HEADER, Topology, declare, routing_bucket
from outbox.rabbitmq_wire import connection_parameters, rabbitmq_url, to_amqp
from relay.publisher import Message

QUEUES = 4
WINDOW = 500
RESULTS = Path(__file__).resolve().parent / "results"


def _properties(message: Message) -> tuple[str, Any]:
    content_type, headers = to_amqp(message.headers)
    headers[PARTITION_KEY_HEADER] = message.key.decode()
    return routing_bucket(message.key), pika.BasicProperties(
        content_type=content_type, delivery_mode=2, message_id=message.event_id, headers=headers)


def raw_blocking(url: str, topic: str, messages: Sequence[Message]) -> float:
    connection = pika.BlockingConnection(connection_parameters(url))
    channel = connection.channel()
    channel.confirm_delivery()
    prepared = [(*_properties(m), m.value) for m in messages]
    started = time.perf_counter()
    for routing_key, properties, body in prepared:
        channel.basic_publish(topic, routing_key, body, properties, mandatory=True)
    elapsed = time.perf_counter() - started
    connection.close()
    return elapsed


def raw_pipelined(url: str, topic: str, messages: Sequence[Message]) -> float:
    """Publish in windows of WINDOW on a SelectConnection; each window waits for its confirms."""
    prepared = [(*_properties(m), m.value) for m in messages]
    state: dict[str, Any] = {"sent": 0, "confirmed": 0, "started": 0.0, "elapsed": 0.0}

    def send_window(channel: Any) -> None:
        end = min(state["sent"] + WINDOW, len(prepared))
        for routing_key, properties, body in prepared[state["sent"]:end]:
            channel.basic_publish(topic, routing_key, body, properties, mandatory=True)
        state["sent"] = end

    def on_confirm(frame: Any) -> None:
        tag = frame.method.delivery_tag
        state["confirmed"] = tag if frame.method.multiple else max(state["confirmed"], tag)
        if state["confirmed"] < state["sent"]:
            return
        if state["sent"] < len(prepared):
            send_window(state["channel"])
        else:
            state["elapsed"] = time.perf_counter() - state["started"]
            connection.close()

    def on_selected(_frame: Any) -> None:
        state["started"] = time.perf_counter()
        send_window(state["channel"])

    def on_channel(channel: Any) -> None:
        state["channel"] = channel
        channel.confirm_delivery(ack_nack_callback=on_confirm, callback=on_selected)

    connection = pika.SelectConnection(
        connection_parameters(url), on_open_callback=lambda c: c.channel(on_open_callback=on_channel),
        on_close_callback=lambda c, exc: c.ioloop.stop())
    connection.ioloop.start()
    return float(state["elapsed"])


def raw_consumer(url: str, engine: Engine, topology: Topology, count: int) -> float:
    connection = pika.BlockingConnection(connection_parameters(url))
    channel = connection.channel()
    channel.basic_qos(prefetch_count=100)
    pending: list[Any] = []
    state = {"done": 0, "started": 0.0}

    def flush() -> None:
        with Session(engine) as session, session.begin():
            for properties in pending:
                session.execute(_INSERT, {"event_id": uuid.UUID(properties[1].message_id)})
        channel.basic_ack(pending[-1][0], multiple=True)  # after the commit
        state["done"] += len(pending)
        pending.clear()

    def received(_ch: Any, method: Any, properties: Any, _body: bytes) -> None:
        if not state["started"]:
            state["started"] = time.perf_counter()
        pending.append((method.delivery_tag, properties))
        if len(pending) >= 50:
            flush()

    for queue in topology.queue_names:
        channel.basic_consume(queue, received)
    while state["done"] + len(pending) < count:
        connection.process_data_events(time_limit=1)
        if pending and state["done"] + len(pending) >= count:
            break
    if pending:
        flush()
    elapsed = time.perf_counter() - state["started"]
    connection.close()
    return elapsed


def kit_consumer(url: str, engine: Engine, topology: Topology, count: int) -> float:
    """Messages per second after the first batch (the subscription is not counted)."""
    consumer = Consumer(engine, group=topology.group, topics=[topology.topic], handler=record_effect,
                        config=ConsumerConfig(poll_timeout_ms=500), transport=RabbitMQ(url, queues=QUEUES))
    try:
        first = 0
        while first == 0:
            first = consumer.run_once(1000)
        started = time.perf_counter()
        handled = first
        while handled < count:
            handled += consumer.run_once(1000)
        return (handled - first) / (time.perf_counter() - started)
    finally:
        consumer.close()


def _effects(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(f"SELECT count(*) FROM {EFFECT_TABLE}")).scalar_one())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rabbitmq_throughput")
    parser.add_argument("--database-url")
    parser.add_argument("--rabbitmq-url")
    parser.add_argument("--events", type=int, default=20_000)
    args = parser.parse_args(argv)
    url = rabbitmq_url(args.rabbitmq_url)
    # No Kafka: the relay is given its RabbitMQ publisher; the address only satisfies RelayConfig.
    env = BenchEnv(database_url=resolve_database_url(args.database_url), bootstrap_servers="unused:9")
    topic = f"bench-{env.run_id}"
    # Both topics have two groups behind them, so every publish is written to two quorum queues.
    raw_topic = f"{topic}-raw"
    groups = {name: Topology(topic=topic, group=name, queues=QUEUES) for name in ("kit", "raw")}
    sinks = [Topology(topic=raw_topic, group=name, queues=QUEUES) for name in ("sink-a", "sink-b")]
    connection = pika.BlockingConnection(connection_parameters(url))
    channel = connection.channel()
    for topology in [*groups.values(), *sinks]:
        declare(channel, topology)
    n = args.events
    results: dict[str, float] = {}
    try:
        messages = sample_messages(n)
        # The raw publishers write to a topic of their own, so the consumers' queues hold the relay's N.
        results["raw pika blocking (confirm each)"] = min(n, 3000) / raw_blocking(url, raw_topic, messages[:3000])
        results["raw pika pipelined (window 500)"] = n / raw_pipelined(url, raw_topic, messages)
        env.reset()
        env.fill(topic, n)
        done, seconds, _cpu = drain_with_relay(
            env, n, label="relay rabbitmq",
            publisher=_relay_publisher(url),
        )
        results["relay (batch 500)"] = done / seconds
        engine = env.engine(pool_size=4)
        with engine.begin() as conn:
            conn.execute(text(_DDL))
            conn.execute(text(f"TRUNCATE {EFFECT_TABLE}"))
        results["raw pika consumer (tx of 50, ack after commit)"] = n / raw_consumer(
            url, engine, groups["raw"], n)
        with engine.begin() as conn:
            conn.execute(text(f"TRUNCATE {EFFECT_TABLE}"))
        results["kit consumer (inbox, tx of 50)"] = kit_consumer(url, engine, groups["kit"], n)
        assert _effects(engine) == n, "the kit consumer applied each message once"
    finally:
        for topology in [*groups.values(), *sinks]:
            for queue in [*topology.queue_names, topology.dead_letter_queue]:
                channel.queue_delete(queue)
            channel.exchange_delete(topology.group_exchange)
            channel.exchange_delete(topology.dead_letter_exchange)
            channel.exchange_delete(topology.topic)
        connection.close()
    results["relay / raw pipelined"] = results["relay (batch 500)"] / results["raw pika pipelined (window 500)"]
    results["relay / raw blocking"] = results["relay (batch 500)"] / results["raw pika blocking (confirm each)"]
    results["kit consumer / raw consumer"] = (results["kit consumer (inbox, tx of 50)"]
                                              / results["raw pika consumer (tx of 50, ack after commit)"])
    commit = os.popen("git rev-parse --short HEAD").read().strip()
    lines = [f"# RabbitMQ throughput, {n:,} events, 4 quorum queues per group, kit at {commit}", "",
             "| What | events/s or ratio |", "|---|---|"]
    lines += [f"| {name} | {value:,.2f} |" if value < 10 else f"| {name} | {value:,.0f} |"
              for name, value in results.items()]
    print("\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "rabbitmq.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "rabbitmq.json").write_text(json.dumps({"events": n, "commit": commit, **results}, indent=2))
    return 0


def _relay_publisher(url: str) -> Any:
    from relay.rabbitmq import RabbitMQPublisher

    return RabbitMQPublisher(url)


if __name__ == "__main__":
    raise SystemExit(main())
