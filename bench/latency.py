"""4. End-to-end latency: writer's COMMIT returned -> the consumer's effect row written.

Paced open-loop writers (bench/load.py) commit events at a fixed offered
rate; a relay process (`python -m relay`) publishes them; a consumer process
(`python -m harness.consumer_proc`, the kit's `Consumer`) applies each one with
a handler that inserts a row stamped with `clock_timestamp()`. Latency is
that stamp minus the writer's wall clock right after COMMIT returned (same
machine, same clock). Each load runs twice: relay woken by LISTEN/NOTIFY
(the default) and relay polling only (`OUTBOX_RELAY_LISTEN=false`, default
poll interval 1 s).
"""

from __future__ import annotations

import math
import statistics
import threading
import time
import uuid
from typing import Any

from bench import procs
from bench.effects import EFFECT_DDL, EFFECT_TABLE
from bench.env import BenchEnv
from bench.load import LoadResult, run_load
from bench.machine import CpuMeter
from bench.report import Row, Section
from bench.settings import Sizes
from harness import progress
from relay.config import RelayConfig

NAME = "4 latency"
MODES = (("LISTEN/NOTIFY", "true"), ("polling only", "false"))


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return float("nan")
    rank = max(math.ceil(q * len(sorted_values)), 1)
    return sorted_values[min(rank, len(sorted_values)) - 1]


def run(env: BenchEnv, sizes: Sizes) -> Section:
    section = Section(NAME)
    env.reset()
    with env.connect() as conn:
        conn.execute(EFFECT_DDL)
        conn.execute(f"TRUNCATE {EFFECT_TABLE}")
    topic = env.topic("latency")
    group = f"bench-{env.run_id}-latency"
    consumer = procs.start_consumer(env, "consumer", [
        "--handler", "bench.effects:record_effect", "--database-url", env.database_url,
        "--bootstrap-servers", env.bootstrap_servers, "--topic", topic, "--group", group,
        "--application-name", "outbox-bench-consumer", "--log-level", "INFO",
    ])
    engine = env.engine(pool_size=4)
    cases: list[dict[str, Any]] = []
    observer = Observer(env, topic)
    observer.start()
    try:
        for rate, per_tx, seconds in sizes.latency_loads:
            for mode, listen in MODES:
                relay_id = f"bench-{env.run_id}-lat-{uuid.uuid4().hex[:4]}"
                relay = procs.start_relay(env, relay_id, listen=listen)
                try:
                    procs.wait_for_leases(env, [relay], [relay_id])
                    _warm_up(env, engine, topic, consumer)
                    case = _measure(env, engine, topic, consumer, relay, rate=rate,
                                    per_tx=per_tx, seconds=seconds, mode=mode, observer=observer)
                finally:
                    relay.stop()
                cases.append(case)
                section.rows.append(_row(case))
    finally:
        observer.stop()
        consumer.stop()
        engine.dispose()
    section.details["cases"] = cases
    section.details["poll_interval_s"] = RelayConfig.poll_interval
    env.reset()
    return section


def _warm_up(env: BenchEnv, engine: Any, topic: str, consumer: procs.Child) -> None:
    """A few events through the whole chain: consumer joined, relay holding leases."""
    load = run_load(engine, topic=topic, rate=50, seconds=0.2, threads=1)
    _wait_applied(env, set(load.committed), consumer, timeout=90)


def _wait_applied(env: BenchEnv, ids: set[uuid.UUID], consumer: procs.Child, *,
                  timeout: float, bar: progress.Bar | None = None) -> dict[uuid.UUID, float]:
    """Poll the effect table until every id has its row; returns id -> applied wall time."""
    applied: dict[uuid.UUID, float] = {}
    deadline = time.monotonic() + timeout
    with env.connect() as conn:
        while True:
            rows = conn.execute(
                f"SELECT event_id, extract(epoch FROM applied_at)::float8 FROM {EFFECT_TABLE}"
            ).fetchall()
            applied = {r[0]: r[1] for r in rows if r[0] in ids}
            if bar:
                bar.reach(len(applied))
            if len(applied) >= len(ids):
                return applied
            consumer.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {len(applied)} of {len(ids)} events applied within {timeout}s; "
                    f"consumer output:\n{consumer.tail()}"
                )
            time.sleep(0.5)


class Observer:
    """A plain consumer in a group of its own: when each event became readable in Kafka.

    It splits the latency into the relay's part (COMMIT -> in Kafka) and the
    consumer's part (in Kafka -> effect written).
    """

    def __init__(self, env: BenchEnv, topic: str) -> None:
        from kafka import KafkaConsumer

        self.seen: dict[uuid.UUID, float] = {}
        self._stop = threading.Event()
        self._consumer = KafkaConsumer(
            topic, bootstrap_servers=env.bootstrap_servers, group_id=f"bench-{env.run_id}-observer",
            enable_auto_commit=False, auto_offset_reset="latest", isolation_level="read_committed",
            fetch_max_wait_ms=100,
        )
        self._thread = threading.Thread(target=self._run, name="observer", daemon=True)

    def start(self) -> None:
        while not self._consumer.assignment():
            self._consumer.poll(timeout_ms=200)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self._consumer.poll(timeout_ms=100, max_records=5000)
            now = time.time()
            for records in batch.values():
                for record in records:
                    for name, value in record.headers:
                        if name == "ce_id":
                            self.seen[uuid.UUID(value.decode())] = now

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self._consumer.close(autocommit=False)


def _measure(env: BenchEnv, engine: Any, topic: str, consumer: procs.Child, relay: procs.Child,
             *, rate: int, per_tx: int, seconds: float, mode: str,
             observer: Observer) -> dict[str, Any]:
    with env.connect() as conn:
        conn.execute(f"TRUNCATE {EFFECT_TABLE}")
    total = int(rate * seconds)
    bar = progress.bar(f"latency {rate}/s {mode}", total)
    meter = CpuMeter(named={consumer.pid: "consumer", relay.pid: "relay"})
    meter.start()
    load: LoadResult = run_load(engine, topic=topic, rate=rate, seconds=seconds,
                                events_per_tx=per_tx, threads=4, on_progress=bar.reach)
    cpu = meter.stop()
    bar.finish(load.events)
    relay.check_alive()
    bar = progress.bar("  waiting for effects", load.events)
    # A consumer that fell behind needs time to catch up; its lag is part of the figure.
    applied = _wait_applied(env, set(load.committed), consumer,
                            timeout=max(120.0, load.events / 200), bar=bar)
    bar.finish(len(applied))
    latencies = sorted(
        (applied[event_id] - committed) * 1000 for event_id, committed in load.committed.items()
    )
    seen = observer.seen
    to_kafka = sorted((seen[e] - c) * 1000 for e, c in load.committed.items() if e in seen)
    from_kafka = sorted((applied[e] - seen[e]) * 1000 for e in load.committed if e in seen)
    return {
        "mode": mode, "offered_per_s": rate, "events_per_tx": per_tx, "seconds": seconds,
        "achieved_per_s": round(load.achieved, 1), "events": load.events,
        "writer_lag_max_ms": round(load.lag_max * 1000, 1),
        "ms": {
            "p50": round(percentile(latencies, 0.50), 1),
            "p99": round(percentile(latencies, 0.99), 1),
            "p99.9": round(percentile(latencies, 0.999), 1),
            "max": round(latencies[-1], 1),
            "mean": round(statistics.fmean(latencies), 1),
            "min": round(latencies[0], 1),
        },
        "split_p50_ms": {
            "commit_to_kafka": round(percentile(to_kafka, 0.5), 1),
            "kafka_to_effect": round(percentile(from_kafka, 0.5), 1),
            "observed": len(to_kafka),
        },
        "split_p99_ms": {
            "commit_to_kafka": round(percentile(to_kafka, 0.99), 1),
            "kafka_to_effect": round(percentile(from_kafka, 0.99), 1),
        },
        # Points of the distribution, for bench/charts.py: quantile -> ms.
        "distribution_ms": {
            "commit_to_effect": {str(q): round(percentile(latencies, q), 2) for q in QUANTILES},
            "commit_to_kafka": ({str(q): round(percentile(to_kafka, q), 2) for q in QUANTILES}
                                if to_kafka else {}),
        },
        "cpu": cpu.as_dict(),
    }


QUANTILES = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0)


def _row(case: dict[str, Any]) -> Row:
    ms = case["ms"]
    kept_up = case["achieved_per_s"] >= 0.95 * case["offered_per_s"]
    return Row(
        NAME,
        f"{case['offered_per_s']:,} ev/s offered ({case['events_per_tx']}/tx), {case['mode']}",
        f"p50 {ms['p50']:,.0f} ms, p99 {ms['p99']:,.0f} ms, p99.9 {ms['p99.9']:,.0f} ms",
        note=(f"{case['events']:,} events, max {ms['max']:,.0f} ms; p50 split: COMMIT -> in Kafka "
              f"{case['split_p50_ms']['commit_to_kafka']:,.0f} ms, in Kafka -> effect "
              f"{case['split_p50_ms']['kafka_to_effect']:,.0f} ms; writers achieved "
              f"{case['achieved_per_s']:,.0f} ev/s" + ("" if kept_up else " (fell behind: "
              f"max lag {case['writer_lag_max_ms']:,.0f} ms)") +
              f"; machine {case['cpu']['busy_share']:.0%} busy"),
    )
