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
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from bench import profiling
from bench.cost import Cost, CostMeter
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
TARGET = 0.8  # confluent-kafka (issue 11)
TARGET_KAFKA_PYTHON = 0.9  # kafka-python: the relay adds its own Python work on the same GIL
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
    max_in_flight: int | None = None,
    cost: CostMeter | None = None,
) -> tuple[int, float, CpuUsage]:
    """Run `Relay.run_once()` until the backlog is empty (or `stop_after` events),
    then `drain()` what is still in flight.

    Returns (events timed, seconds, cpu); the first round is a warm-up.
    `cost`, if given, is started and stopped around the timed part.
    """
    window = {} if max_in_flight is None else {"max_in_flight": max_in_flight}
    relay = Relay(relay_config(env, batch_size=batch_size, **window), publisher=publisher)
    bar = progress.bar(label, stop_after or events)
    try:
        warm = relay.run_once()
        target = (stop_after or events) - warm
        meter = CpuMeter()
        meter.start()
        if cost is not None:
            cost.start()
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
            done += relay.drain()  # the last deletes are part of the work
        elapsed = time.perf_counter() - started
        cpu = meter.stop()
        if cost is not None:
            cost.stop()
        bar.finish(done + warm)
        return done, elapsed, cpu
    finally:
        relay.close()


def fill_and_drain(
    env: BenchEnv, topic: str, events: int, *, publisher: Publisher, batch_size: int, label: str,
    max_in_flight: int | None = None, cost: CostMeter | None = None,
) -> tuple[FillReport, int, float, CpuUsage]:
    """Empty the tables, fill a backlog of `events` for `topic`, drain it with `drain_with_relay`.

    Returns (the fill's report, events timed, seconds, cpu).
    """
    env.reset()
    bar = progress.bar("fill backlog", events)
    fill = env.fill(topic, events, on_progress=bar.reach)
    bar.finish(events)
    done, seconds, cpu = drain_with_relay(
        env, events, publisher=publisher, batch_size=batch_size, label=label,
        max_in_flight=max_in_flight, cost=cost,
    )
    return fill, done, seconds, cpu


def raw_kafka_python(
    env: BenchEnv, topic: str, messages: Sequence[Message], count: int, *, flush_every: int | None,
    cost: CostMeter | None = None,
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
        if cost is not None:
            cost.start()
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
        if cost is not None:
            cost.stop()
        bar.finish(count)
        return elapsed, cpu
    finally:
        producer.close()


def _warm(send: Callable[[Message], Any], flush: Callable[[], Any], messages: Sequence[Message]) -> None:
    for m in messages[:500]:
        send(m)
    flush()


@dataclass
class Figures:
    """The best of `repeats` runs of one case (the one least disturbed by other load)."""

    label: str
    rates: list[float] = field(default_factory=list)
    costs: list[Cost] = field(default_factory=list)
    cpu: CpuUsage | None = None
    events: int = 0

    def add(self, events: int, seconds: float, cpu: CpuUsage, cost: Cost) -> None:
        rate = events / seconds
        if not self.rates or rate > max(self.rates):
            self.cpu = cpu
        self.rates.append(rate)
        self.costs.append(cost)
        self.events = events

    @property
    def best(self) -> float:
        return max(self.rates)

    def cost(self) -> Cost:
        """The cheapest of the runs (CPU and WAL each): other load only adds."""
        return Cost(min(c.cpu_seconds for c in self.costs), min(c.wal_bytes for c in self.costs))

    def as_dict(self) -> dict[str, Any]:
        return {"events": self.events, "events_per_s": [round(r, 1) for r in self.rates],
                "best": round(self.best, 1), **self.cost().per_1000(self.events),
                "cpu": self.cpu.as_dict() if self.cpu else None}


def run(env: BenchEnv, sizes: Sizes) -> Section:
    """Each case `relay_repeats` times, interleaved (relay, raw, relay, raw, ...), so
    that load from elsewhere on the machine falls on both sides; best of each."""
    section = Section(NAME)
    events = sizes.relay_events
    batch = sizes.relay_batch_size
    messages = sample_messages(min(POOL, events))
    window = RelayConfig.__dataclass_fields__["max_in_flight"].default
    relay_topic, raw_topic = env.topic("relay"), env.topic("raw")
    relay, single, raw = (Figures("relay"), Figures("relay, window 1"), Figures("raw"))
    null = Figures("no broker")
    acked = 0
    with env.connect() as conn:
        cost = CostMeter(conn)
        for _ in range(sizes.relay_repeats):
            fill, done, seconds, cpu = fill_and_drain(
                env, relay_topic, events, publisher=KafkaPublisher(env.bootstrap_servers),
                batch_size=batch, label="relay (kafka-python)", cost=cost,
            )
            relay.add(done, seconds, cpu, cost.last)
            acked = env.end_offsets(relay_topic)
            seconds, cpu = raw_kafka_python(env, raw_topic, messages, done, flush_every=None, cost=cost)
            raw.add(done, seconds, cpu, cost.last)
            _, done1, seconds, cpu = fill_and_drain(
                env, relay_topic, events, publisher=KafkaPublisher(env.bootstrap_servers),
                batch_size=batch, label="relay (kafka-python, window 1)", max_in_flight=1, cost=cost,
            )
            single.add(done1, seconds, cpu, cost.last)
        rawb_s, _ = raw_kafka_python(env, env.topic("rawbatch"), messages, relay.events,
                                     flush_every=batch)
        # The same loop with a publisher that acknowledges at once: what the
        # database round trips and the encoding alone allow.
        _, null_done, null_s, null_cpu = fill_and_drain(
            env, relay_topic, events, publisher=NullPublisher(), batch_size=batch,
            label="relay (no broker)", cost=cost,
        )
        null.add(null_done, null_s, null_cpu, cost.last)
        _confluent(env, section, events, batch, messages, cost, sizes.relay_repeats)
    rawb_rate = relay.events / rawb_s
    relay_row = Row(
        NAME, f"relay, kafka-python, batch {batch}, window {window}, {events:,} events",
        f"{relay.best:,.0f} ev/s", relay.best, raw.best, "msg/s raw kafka-python, one stream",
        TARGET_KAFKA_PYTHON,
        note=(f"best of {sizes.relay_repeats}, interleaved with the raw runs; relay: "
              f"{relay.cost().describe(relay.events)}; raw: {raw.cost().describe(raw.events)} "
              f"(CPU ratio raw/relay {raw.cost().cpu_seconds / max(relay.cost().cpu_seconds, 1e-9):.2f}); "
              f"raw flushing every {batch}: {rawb_rate:,.0f} msg/s; relay machine CPU: "
              f"{relay.cpu.describe() if relay.cpu else '-'}"),
    )
    section.rows.append(relay_row)
    section.rows.append(Row(
        NAME, "relay, kafka-python, window 1 (one batch at a time, as before the window)",
        f"{single.best:,.0f} ev/s", single.best, raw.best, "msg/s raw kafka-python, one stream",
        note=f"{single.cost().describe(single.events)}",
    ))
    section.rows.append(Row(
        NAME, f"relay loop with a publisher that acks at once, batch {batch}",
        f"{null.best:,.0f} ev/s", None, None, "the kit's own ceiling: fetch + encode + delete",
        note=f"{null.cost().describe(null.events)}; CPU: {null_cpu.describe()}",
    ))
    section.details["kafka-python"] = {
        "events": events, "batch_size": batch, "max_in_flight": window,
        "repeats": sizes.relay_repeats, "fill": fill.describe(),
        "relay": {**relay.as_dict(), "broker_end_offsets": acked},
        "relay_window_1": single.as_dict(),
        "raw_stream": raw.as_dict(),
        "raw_flush_every_batch": {"msgs_per_s": round(rawb_rate, 1)},
        "relay_no_broker": null.as_dict(),
        "producer_settings": {k: v for k, v in producer_config(env.bootstrap_servers, {}).items()
                              if k != "bootstrap_servers"},
        "message_bytes": {"key": len(messages[0].key), "value": len(messages[0].value),
                          "headers": sum(len(k) + len(v) for k, v in messages[0].headers)},
    }
    if acked < events:
        relay_row.note += f"; WARNING: broker holds only {acked:,} of {events:,}"
    env.reset()
    return section


def _confluent(
    env: BenchEnv, section: Section, events: int, batch: int, messages: Sequence[Message],
    cost: CostMeter, repeats: int,
) -> None:
    try:
        from relay.confluent import ConfluentPublisher, confluent_config
    except ImportError as exc:
        section.details["confluent"] = f"skipped: {exc}"
        return
    topic, raw_topic = env.topic("relaycf"), env.topic("rawcf")
    config = confluent_config(env.bootstrap_servers, {})
    relay, raw = Figures("relay"), Figures("raw")
    acked = 0
    for _ in range(repeats):
        _, done, seconds, cpu = fill_and_drain(
            env, topic, events, publisher=ConfluentPublisher(env.bootstrap_servers),
            batch_size=batch, label="relay (confluent)", cost=cost,
        )
        relay.add(done, seconds, cpu, cost.last)
        acked = env.end_offsets(topic)
        seconds, cpu = raw_confluent(env, raw_topic, messages, done, flush_every=None,
                                     config=config, cost=cost)
        raw.add(done, seconds, cpu, cost.last)
    rawb_s, _ = raw_confluent(env, env.topic("rawcfb"), messages, relay.events, flush_every=batch,
                              config=config)
    rawb_rate = relay.events / rawb_s
    section.rows.append(Row(
        NAME, f"relay, confluent-kafka, batch {batch}, {events:,} events",
        f"{relay.best:,.0f} ev/s", relay.best, raw.best, "msg/s raw confluent-kafka, one stream",
        TARGET,
        note=(f"best of {repeats}, interleaved; relay: {relay.cost().describe(relay.events)}; raw: "
              f"{raw.cost().describe(raw.events)}; raw flushing every {batch}: {rawb_rate:,.0f} msg/s; "
              f"relay machine CPU: {relay.cpu.describe() if relay.cpu else '-'}"),
    ))
    section.details["confluent"] = {
        "relay": {**relay.as_dict(), "broker_end_offsets": acked},
        "raw_stream": raw.as_dict(),
        "raw_flush_every_batch": {"msgs_per_s": round(rawb_rate, 1)},
        "producer_settings": config,
    }


def raw_confluent(
    env: BenchEnv, topic: str, messages: Sequence[Message], count: int, *,
    flush_every: int | None, config: dict[str, Any], cost: CostMeter | None = None,
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
    if cost is not None:
        cost.start()
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
    if cost is not None:
        cost.stop()
    bar.finish(count)
    if errors:
        raise RuntimeError(f"raw confluent producer: {len(errors)} delivery errors, e.g. {errors[0]}")
    return elapsed, cpu
