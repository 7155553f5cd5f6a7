"""5. Consumer throughput with exactly-once effects vs a raw consumer doing the same write.

Messages are produced up front with a raw producer (CloudEvents headers from
`outbox.envelope.encode_headers`, unique event ids). Then, on the same topic,
each with a consumer group of its own:

- the kit: `outbox.Consumer` (inbox row + a handler inserting one effect
  row, one transaction per message, offsets committed after each poll);
- raw: a kafka-python `KafkaConsumer` with the same settings (no auto
  commit, read_committed, the same records per poll) that inserts the same
  effect row with the same commit pattern (the messages of a poll in
  transactions of the kit's `transaction_batch_size`, 1 if the kit has no
  such setting; offsets committed once per poll), without any deduplication;
- for reference (full run), the raw consumer with one transaction per message.

All are timed from the first batch received, so the group join is not
counted; the runs alternate (raw, kit, raw, kit, ...).
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import OffsetAndMetadata
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from bench import profiling
from bench.env import EVENT_TYPE, BenchEnv, payment_payload, traceparent
from bench.machine import CpuMeter, CpuUsage
from bench.report import Row, Section
from bench.settings import Sizes
from harness import progress
from outbox.consumer import Consumer, ConsumerConfig
from outbox.envelope import encode_headers
from outbox.event import Event
from relay.kafka import producer_config

NAME = "5 consumer throughput"
TARGET = 0.7
EFFECT_TABLE = "bench_consumer_effect"
_DDL = f"""
CREATE TABLE IF NOT EXISTS {EFFECT_TABLE} (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id uuid NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""
_INSERT = text(f"INSERT INTO {EFFECT_TABLE} (event_id) VALUES (:event_id)")
POLL_RECORDS = ConsumerConfig().poll_batch_size
# The kit's messages per database transaction (older kits: one transaction per message).
TX_BATCH = int(getattr(ConsumerConfig(), "transaction_batch_size", 1))


def record_effect(session: Session, event: Event) -> None:
    session.execute(_INSERT, {"event_id": event.id})


def produce(env: BenchEnv, topic: str, count: int) -> None:
    producer = KafkaProducer(**producer_config(env.bootstrap_servers, {}))
    bar = progress.bar("produce", count)
    now = datetime.now(UTC)
    try:
        for n in range(count):
            key = str(uuid.uuid4())
            headers = encode_headers(
                event_id=uuid.uuid4(), type=EVENT_TYPE, source="outbox-bench", time=now,
                content_type="application/json", headers={"traceparent": traceparent(key, n)},
            )
            producer.send(topic, key=key.encode(), value=payment_payload(key, n), headers=headers)
            if n % 2000 == 0:
                bar.reach(n)
        producer.flush()
        bar.finish(count)
    finally:
        producer.close()


def run_kit(env: BenchEnv, engine: Engine, topic: str, count: int) -> tuple[int, float, float, CpuUsage]:
    """(messages timed, seconds after the first batch, seconds including the join, cpu)."""
    consumer = Consumer(
        engine, group=f"bench-{env.run_id}-kit-{uuid.uuid4().hex[:4]}", topics=[topic],
        handler=record_effect, bootstrap_servers=env.bootstrap_servers, config=ConsumerConfig(),
    )
    bar = progress.bar("kit Consumer", count)
    meter = CpuMeter()
    started = time.perf_counter()
    first_at, first = 0.0, 0
    try:
        with profiling.profiled("kit consumer"):
            while consumer.stats.applied < count:
                handled = consumer.run_once(500)
                if handled and not first_at:
                    first_at, first = time.perf_counter(), handled
                    meter.start()
                bar.reach(consumer.stats.applied)
        finished = time.perf_counter()
        cpu = meter.stop()
    finally:
        consumer.close()
    bar.finish(consumer.stats.applied)
    return count - first, finished - first_at, finished - started, cpu


def run_raw(env: BenchEnv, engine: Engine, topic: str, count: int, *,
            tx_batch: int = TX_BATCH) -> tuple[int, float, float, CpuUsage]:
    consumer = KafkaConsumer(
        topic, bootstrap_servers=env.bootstrap_servers,
        group_id=f"bench-{env.run_id}-raw-{uuid.uuid4().hex[:4]}", enable_auto_commit=False,
        auto_offset_reset="earliest", isolation_level="read_committed",
        max_poll_records=POLL_RECORDS,
    )
    bar = progress.bar(f"raw KafkaConsumer ({tx_batch}/tx)", count)
    meter = CpuMeter()
    started = time.perf_counter()
    first_at, first, applied = 0.0, 0, 0
    try:
        while applied < count:
            batch = consumer.poll(timeout_ms=500, max_records=POLL_RECORDS)
            offsets: dict[Any, OffsetAndMetadata] = {}
            records = [(tp, r) for tp, rs in batch.items() for r in rs]
            for start in range(0, len(records), tx_batch):
                chunk = records[start:start + tx_batch]
                with Session(engine) as session, session.begin():
                    for _, record in chunk:
                        event_id = next(
                            uuid.UUID(v.decode()) for k, v in record.headers if k == "ce_id"
                        )
                        session.execute(_INSERT, {"event_id": event_id})
                for tp, record in chunk:
                    offsets[tp] = OffsetAndMetadata(record.offset + 1, "", -1)
                applied += len(chunk)
            if offsets:
                consumer.commit(offsets)
                if not first_at:
                    first_at, first = time.perf_counter(), applied
                    meter.start()
            bar.reach(applied)
        finished = time.perf_counter()
        cpu = meter.stop()
    finally:
        consumer.close(autocommit=False)
    bar.finish(applied)
    return count - first, finished - first_at, finished - started, cpu


def _describe_cpu(cpu: dict[str, Any]) -> str:
    parts = ", ".join(f"{k} {v:.2f}" for k, v in cpu["cores_used"].items())
    return f"machine {cpu['busy_share']:.0%} busy ({parts} cores)"


def run(env: BenchEnv, sizes: Sizes) -> Section:
    section = Section(NAME)
    count = sizes.consumer_messages
    engine = env.engine(pool_size=2)
    with engine.begin() as conn:
        conn.execute(text(_DDL))
        conn.execute(text(f"TRUNCATE {EFFECT_TABLE}"))
    env.reset()
    topic = env.topic("consume")
    produce(env, topic, count)
    totals = {"raw": [0, 0.0, 0.0], "kit": [0, 0.0, 0.0], "raw1": [0, 0.0, 0.0]}
    cpus: dict[str, list[dict[str, Any]]] = {"raw": [], "kit": [], "raw1": []}
    rounds = 2 if sizes.mode == "full" else 1
    runs: list[tuple[str, Any]] = [("raw", run_raw), ("kit", run_kit)]
    if TX_BATCH != 1 and sizes.mode == "full":
        runs.append(("raw1", lambda *a: run_raw(*a, tx_batch=1)))
    try:
        for _ in range(rounds):
            for label, fn in runs:
                timed, seconds, with_join, cpu = fn(env, engine, topic, count)
                totals[label][0] += timed
                totals[label][1] += seconds
                totals[label][2] += with_join
                cpus[label].append(cpu.as_dict())
    finally:
        engine.dispose()
    raw_rate = totals["raw"][0] / totals["raw"][1]
    kit_rate = totals["kit"][0] / totals["kit"][1]
    raw1 = f"; raw with one transaction per message {totals['raw1'][0] / totals['raw1'][1]:,.0f} msg/s" \
        if totals["raw1"][1] else ""
    section.rows.append(Row(
        NAME, f"outbox.Consumer, {count:,} messages x {rounds}, {TX_BATCH} per transaction",
        f"{kit_rate:,.0f} msg/s", kit_rate, raw_rate,
        "msg/s raw KafkaConsumer, same writes and commits, no dedup", TARGET,
        note=(f"including the group join: kit {count * rounds / totals['kit'][2]:,.0f}, raw "
              f"{count * rounds / totals['raw'][2]:,.0f} msg/s{raw1}; kit CPU: "
              f"{_describe_cpu(cpus['kit'][-1])}"),
    ))
    section.details = {
        "messages": count, "rounds": rounds, "poll_records": POLL_RECORDS,
        "messages_per_transaction": TX_BATCH,
        "kit": {"messages_per_s": round(kit_rate, 1), "cpu": cpus["kit"]},
        "raw": {"messages_per_s": round(raw_rate, 1), "cpu": cpus["raw"]},
    }
    if totals["raw1"][1]:
        section.details["raw_one_per_transaction"] = {
            "messages_per_s": round(totals["raw1"][0] / totals["raw1"][1], 1), "cpu": cpus["raw1"],
        }
    with env.connect() as conn:
        conn.execute(f"TRUNCATE {EFFECT_TABLE}")
    env.reset()
    return section
