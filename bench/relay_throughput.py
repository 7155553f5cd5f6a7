"""2. Relay throughput: events/s from a pre-filled backlog to acknowledged in Kafka, vs a raw producer.

The backlog is filled in SQL (`BenchEnv.fill`). The relay runs in this
process: `Relay.run_once()` in a loop until the backlog is empty, with the
relay's default settings (batch 500, the producer settings of
relay/kafka.py). The first round is not timed (it connects, takes the
leases, loads topic metadata); the same holds for the raw producer, which
sends the remaining messages of the same size, with the same headers and
the same producer settings (`relay.kafka.producer_config`) to a topic of its
own, as one stream: `send()` each message, one `flush()` at the end.

A second raw figure flushes every `batch_size` messages, the way the relay
must (it deletes a batch only once every message of it is acknowledged),
to show what the round structure itself costs.

With confluent-kafka installed, the same two figures are measured with
relay/confluent.py's publisher and a raw confluent producer.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from bench import profiling
from bench.env import EVENT_TYPE, BenchEnv, FillReport, payment_payload, traceparent
from bench.machine import CpuMeter, CpuUsage
from bench.report import Row, Section
from bench.settings import Sizes
from harness import progress
from outbox.envelope import encode_headers
from relay.config import RelayConfig
from relay.kafka import KafkaPublisher, producer_config
from relay.publisher import ACKNOWLEDGED, Delivery, Message, Publisher
from relay.relay import Relay

NAME = "2 relay throughput"
TARGET = 0.8
POOL = 10_000  # distinct raw messages, sent round-robin


class NullPublisher:
    """Acknowledges everything at once: the relay loop's own ceiling (database + encoding)."""

    def publish(self, messages: Sequence[Message]) -> list[Delivery]:
        return [ACKNOWLEDGED] * len(messages)

    def close(self) -> None:
        pass


def sample_messages(count: int, source: str = "outbox-relay") -> list[Message]:
    """Messages shaped exactly like the relay's (key, payload, CloudEvents headers)."""
    now = datetime.now(UTC)
    messages = []
    for n in range(1, count + 1):
        key = str(uuid.uuid4())
        event_id = uuid.uuid4()
        messages.append(Message(
            event_id=str(event_id), topic="", key=key.encode(), value=payment_payload(key, n),
            headers=encode_headers(
                event_id=event_id, type=EVENT_TYPE, source=source, time=now,
                content_type="application/json", headers={"traceparent": traceparent(key, n)},
            ),
        ))
    return messages


def relay_config(env: BenchEnv, **overrides: Any) -> RelayConfig:
    values: dict[str, Any] = {
        "database_url": env.database_url,
        "bootstrap_servers": env.bootstrap_servers,
        "relay_id": f"bench-{env.run_id}-{uuid.uuid4().hex[:4]}",
        "listen": False,
    }
    values.update(overrides)
    return RelayConfig(**values)


def drain_with_relay(
    env: BenchEnv,
    events: int,
    *,
    publisher: Publisher | None = None,
    batch_size: int = 500,
    label: str = "relay",
    stop_after: int | None = None,
) -> tuple[int, float, CpuUsage]:
    """Run `Relay.run_once()` until the backlog is empty (or `stop_after` events).

    Returns (events timed, seconds, cpu); the first round is a warm-up.
    """
    relay = Relay(relay_config(env, batch_size=batch_size), publisher=publisher)
    bar = progress.bar(label, stop_after or events)
    try:
        warm = relay.run_once()
        target = (stop_after or events) - warm
        meter = CpuMeter()
        meter.start()
        started = time.perf_counter()
        done = 0
        idle = 0
        with profiling.profiled(label):
            while done < target:
                n = relay.run_once()
                done += n
                idle = idle + 1 if n == 0 else 0
                if idle > 50:
                    raise RuntimeError(f"{label}: relay made no progress with {target - done} left")
                bar.reach(done + warm)
        elapsed = time.perf_counter() - started
        cpu = meter.stop()
        bar.finish(done + warm)
        return done, elapsed, cpu
    finally:
        relay.close()


def fill_and_drain(
    env: BenchEnv, topic: str, events: int, *, publisher: Publisher, batch_size: int, label: str,
) -> tuple[FillReport, int, float, CpuUsage]:
    """Empty the tables, fill a backlog of `events` for `topic`, drain it with `drain_with_relay`.

    Returns (the fill's report, events timed, seconds, cpu).
    """
    env.reset()
    bar = progress.bar("fill backlog", events)
    fill = env.fill(topic, events, on_progress=bar.reach)
    bar.finish(events)
    done, seconds, cpu = drain_with_relay(
        env, events, publisher=publisher, batch_size=batch_size, label=label
    )
    return fill, done, seconds, cpu


def raw_kafka_python(
    env: BenchEnv, topic: str, messages: Sequence[Message], count: int, *, flush_every: int | None
) -> tuple[float, CpuUsage]:
    """kafka-python with the relay's producer settings; returns (seconds for `count`, cpu)."""
    from kafka import KafkaProducer

    producer = KafkaProducer(**producer_config(env.bootstrap_servers, {}))
    try:
        _warm(lambda m: producer.send(topic, key=m.key, value=m.value, headers=m.headers),
              producer.flush, messages)
        label = "raw kafka-python" + (f" (flush/{flush_every})" if flush_every else "")
        bar = progress.bar(label, count)
        meter = CpuMeter()
        meter.start()
        started = time.perf_counter()
        pool = len(messages)
        send = producer.send
        for i in range(count):
            m = messages[i % pool]
            send(topic, key=m.key, value=m.value, headers=m.headers)
            if flush_every and (i + 1) % flush_every == 0:
                producer.flush()
                bar.reach(i + 1)
            elif i % 5000 == 0:
                bar.reach(i)
        producer.flush()
        elapsed = time.perf_counter() - started
        cpu = meter.stop()
        bar.finish(count)
        return elapsed, cpu
    finally:
        producer.close()


def _warm(send: Callable[[Message], Any], flush: Callable[[], Any], messages: Sequence[Message]) -> None:
    for m in messages[:500]:
        send(m)
    flush()


def run(env: BenchEnv, sizes: Sizes) -> Section:
    section = Section(NAME)
    events = sizes.relay_events
    batch = sizes.relay_batch_size
    messages = sample_messages(min(POOL, events))

    # Relay with kafka-python.
    relay_topic = env.topic("relay")
    fill, done, relay_s, relay_cpu = fill_and_drain(
        env, relay_topic, events, publisher=KafkaPublisher(env.bootstrap_servers),
        batch_size=batch, label="relay (kafka-python)",
    )
    relay_rate = done / relay_s
    acked = env.end_offsets(relay_topic)

    raw_topic = env.topic("raw")
    raw_s, raw_cpu = raw_kafka_python(env, raw_topic, messages, done, flush_every=None)
    raw_rate = done / raw_s
    rawb_topic = env.topic("rawbatch")
    rawb_s, rawb_cpu = raw_kafka_python(env, rawb_topic, messages, done, flush_every=batch)
    rawb_rate = done / rawb_s

    # The same loop with a publisher that acknowledges at once: what the
    # database round trips and the encoding alone allow.
    _, null_done, null_s, null_cpu = fill_and_drain(
        env, relay_topic, events, publisher=NullPublisher(), batch_size=batch,
        label="relay (no broker)",
    )
    null_rate = null_done / null_s

    relay_row = Row(
        NAME, f"relay, kafka-python, batch {batch}, {events:,} events",
        f"{relay_rate:,.0f} ev/s", relay_rate, raw_rate, "msg/s raw kafka-python, one stream",
        TARGET,
        note=(f"raw kafka-python flushing every {batch}: {rawb_rate:,.0f} msg/s; "
              f"relay CPU: {relay_cpu.describe()}; raw CPU: {raw_cpu.describe()}"),
    )
    section.rows.append(relay_row)
    section.rows.append(Row(
        NAME, f"relay loop with a publisher that acks at once, batch {batch}",
        f"{null_rate:,.0f} ev/s", None, None, "the kit's own ceiling: fetch + encode + delete",
        note=f"CPU: {null_cpu.describe()}",
    ))
    section.details["kafka-python"] = {
        "events": events, "timed_events": done, "batch_size": batch,
        "fill": fill.describe(),
        "relay": {"seconds": round(relay_s, 2), "events_per_s": round(relay_rate, 1),
                  "cpu": relay_cpu.as_dict(), "broker_end_offsets": acked},
        "raw_stream": {"seconds": round(raw_s, 2), "msgs_per_s": round(raw_rate, 1),
                       "cpu": raw_cpu.as_dict()},
        "raw_flush_every_batch": {"seconds": round(rawb_s, 2), "msgs_per_s": round(rawb_rate, 1),
                                  "cpu": rawb_cpu.as_dict()},
        "relay_no_broker": {"seconds": round(null_s, 2), "events_per_s": round(null_rate, 1),
                            "cpu": null_cpu.as_dict()},
        "producer_settings": {k: v for k, v in producer_config(env.bootstrap_servers, {}).items()
                              if k != "bootstrap_servers"},
        "message_bytes": {"key": len(messages[0].key), "value": len(messages[0].value),
                          "headers": sum(len(k) + len(v) for k, v in messages[0].headers)},
    }
    if acked < events:
        relay_row.note += f"; WARNING: broker holds only {acked:,} of {events:,}"

    _confluent(env, section, events, batch, messages)
    env.reset()
    return section


def _confluent(
    env: BenchEnv, section: Section, events: int, batch: int, messages: Sequence[Message]
) -> None:
    try:
        from relay.confluent import ConfluentPublisher, confluent_config
    except ImportError as exc:
        section.details["confluent"] = f"skipped: {exc}"
        return
    topic = env.topic("relaycf")
    _, done, relay_s, relay_cpu = fill_and_drain(
        env, topic, events, publisher=ConfluentPublisher(env.bootstrap_servers),
        batch_size=batch, label="relay (confluent)",
    )
    relay_rate = done / relay_s
    acked = env.end_offsets(topic)
    raw_s, raw_cpu = raw_confluent(env, env.topic("rawcf"), messages, done, flush_every=None,
                                   config=confluent_config(env.bootstrap_servers, {}))
    rawb_s, _ = raw_confluent(env, env.topic("rawcfb"), messages, done, flush_every=batch,
                              config=confluent_config(env.bootstrap_servers, {}))
    raw_rate, rawb_rate = done / raw_s, done / rawb_s
    base = section.details["kafka-python"]["raw_stream"]["msgs_per_s"]
    section.rows.append(Row(
        NAME, f"relay, confluent-kafka, batch {batch}, {events:,} events",
        f"{relay_rate:,.0f} ev/s", relay_rate, raw_rate, "msg/s raw confluent-kafka, one stream",
        TARGET,
        note=(f"raw confluent flushing every {batch}: {rawb_rate:,.0f} msg/s; raw kafka-python "
              f"stream {base:,.0f} msg/s; relay CPU: {relay_cpu.describe()}"),
    ))
    section.details["confluent"] = {
        "relay": {"seconds": round(relay_s, 2), "events_per_s": round(relay_rate, 1),
                  "cpu": relay_cpu.as_dict(), "broker_end_offsets": acked},
        "raw_stream": {"seconds": round(raw_s, 2), "msgs_per_s": round(raw_rate, 1),
                       "cpu": raw_cpu.as_dict()},
        "raw_flush_every_batch": {"seconds": round(rawb_s, 2), "msgs_per_s": round(rawb_rate, 1)},
        "producer_settings": confluent_config(env.bootstrap_servers, {}),
    }


def raw_confluent(
    env: BenchEnv, topic: str, messages: Sequence[Message], count: int, *,
    flush_every: int | None, config: dict[str, Any],
) -> tuple[float, CpuUsage]:
    from confluent_kafka import Producer

    producer = Producer(config)
    errors: list[Any] = []

    def on_delivery(err: Any, msg: Any) -> None:
        if err is not None:
            errors.append(err)

    def send(m: Message) -> None:
        while True:
            try:
                headers: list[tuple[str, str | bytes | None]] = list(m.headers)
                producer.produce(topic, value=m.value, key=m.key, headers=headers,
                                 on_delivery=on_delivery)
                return
            except BufferError:  # local queue full: serve callbacks, try again
                producer.poll(0.05)

    _warm(send, producer.flush, messages)
    label = "raw confluent" + (f" (flush/{flush_every})" if flush_every else "")
    bar = progress.bar(label, count)
    meter = CpuMeter()
    meter.start()
    started = time.perf_counter()
    pool = len(messages)
    for i in range(count):
        send(messages[i % pool])
        if flush_every and (i + 1) % flush_every == 0:
            producer.flush()
            bar.reach(i + 1)
        elif i % 5000 == 0:
            producer.poll(0)
            bar.reach(i)
    producer.flush()
    elapsed = time.perf_counter() - started
    cpu = meter.stop()
    bar.finish(count)
    if errors:
        raise RuntimeError(f"raw confluent producer: {len(errors)} delivery errors, e.g. {errors[0]}")
    return elapsed, cpu
