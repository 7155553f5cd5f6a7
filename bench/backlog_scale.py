"""3. Backlog scale: relay cost per event with 10 thousand to 10 million rows waiting, and bloat.

(a) The table is topped up to each size in turn (10k, 1M, 10M; quick: 10k,
200k), then a fixed number of events is drained from the front and timed,
twice: with the kafka-python publisher (what a deployment sees) and with a
publisher that acknowledges at once (the database side alone, where a size
effect would show first). The fetch's plan is recorded for each size.

(b) A steady run: paced writers and a relay process (`python -m relay`) for
N seconds on a fresh table; table and index sizes, live and dead tuples and
autovacuum runs are sampled every second. Nothing here runs VACUUM: the
figures show what autovacuum does on its own.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg

from bench import procs
from bench.env import BenchEnv
from bench.load import run_load
from bench.relay_throughput import NullPublisher, drain_with_relay
from bench.report import Row, Section
from bench.settings import Sizes
from harness import progress
from relay import store
from relay.kafka import KafkaPublisher

NAME = "3 backlog scale"

_SIZES = """
SELECT pg_total_relation_size('outbox_event'), pg_relation_size('outbox_event'),
       pg_indexes_size('outbox_event'),
       coalesce(n_live_tup, 0), coalesce(n_dead_tup, 0), coalesce(autovacuum_count, 0),
       coalesce(autoanalyze_count, 0)
FROM pg_stat_user_tables WHERE relname = 'outbox_event'
"""


def sizes_now(conn: psycopg.Connection[Any]) -> dict[str, int]:
    row = conn.execute(_SIZES).fetchone()
    keys = ("total_bytes", "heap_bytes", "index_bytes", "live_tuples", "dead_tuples",
            "autovacuum_count", "autoanalyze_count")
    return dict(zip(keys, (int(v) for v in row), strict=True)) if row else {}


def fetch_plan(conn: psycopg.Connection[Any]) -> str:
    rows = conn.execute(
        "EXPLAIN (COSTS OFF) " + store._FETCH_SHARDS.replace("%s", "{}").format(
            "ARRAY[0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15]::smallint[]", "500"
        )
    ).fetchall()
    return " / ".join(r[0].strip() for r in rows)


def run(env: BenchEnv, sizes: Sizes) -> Section:
    section = Section(NAME)
    _scale(env, sizes, section)
    _steady(env, sizes, section)
    env.reset()
    return section


def _scale(env: BenchEnv, sizes: Sizes, section: Section) -> None:
    env.reset()
    topic = env.topic("backlog")
    per_size: list[dict[str, Any]] = []
    first_rate: dict[str, float] = {}
    next_n = 1
    for size in sorted(sizes.backlog_sizes):
        measured = min(sizes.backlog_measured, size)
        entry: dict[str, Any] = {"rows": size, "measured_events": measured}
        for label, make in (("kafka-python", lambda: KafkaPublisher(env.bootstrap_servers)),
                            ("no broker", NullPublisher)):
            with env.connect() as conn:
                missing = size - env.backlog(conn)
            if missing > 0:
                bar = progress.bar(f"fill to {size:,}", missing)
                fill = env.fill(topic, missing, first=next_n, on_progress=bar.reach)
                bar.finish(missing)
                next_n += missing
                entry.setdefault("fills", []).append(fill.describe())
            with env.connect() as conn:
                entry.setdefault("before", sizes_now(conn))
                entry["fetch_plan"] = fetch_plan(conn)
            done, seconds, cpu = drain_with_relay(
                env, size, publisher=make(), stop_after=measured,
                label=f"{label} @ {size:,}",
            )
            rate = done / seconds
            entry[label] = {"events": done, "seconds": round(seconds, 2),
                            "events_per_s": round(rate, 1), "us_per_event": round(1e6 / rate, 1),
                            "cpu": cpu.as_dict()}
            first_rate.setdefault(label, rate)
            section.rows.append(Row(
                NAME, f"{label}: {done:,} events from {size:,} rows",
                f"{rate:,.0f} ev/s", rate, first_rate[label],
                f"ev/s at {min(sizes.backlog_sizes):,} rows", 0.8,
                note=(f"{1e6 / rate:.0f} us/event; table {entry['before'].get('total_bytes', 0) / 2**20:,.0f} MiB;"
                      f" plan: {entry['fetch_plan']}") if label == "no broker" else
                f"{1e6 / rate:.0f} us/event",
            ))
        per_size.append(entry)
    section.details["scale"] = per_size
    env.reset()


def _steady(env: BenchEnv, sizes: Sizes, section: Section) -> None:
    env.reset()
    topic = env.topic("steady")
    relay_id = f"bench-{env.run_id}-steady"
    samples: list[dict[str, Any]] = []
    stop = threading.Event()
    started = time.monotonic()

    def sample() -> None:
        with env.connect() as conn:
            while not stop.is_set():
                entry: dict[str, Any] = dict(sizes_now(conn))
                entry["t"] = round(time.monotonic() - started, 1)
                entry["backlog"] = env.backlog(conn)
                samples.append(entry)
                stop.wait(1.0)

    relay = procs.start_relay(env, relay_id)
    engine = env.engine(pool_size=4)
    sampler = threading.Thread(target=sample, daemon=True)
    try:
        procs.wait_for_leases(env, [relay], [relay_id])
        sampler.start()
        total = int(sizes.steady_rate * sizes.steady_seconds)
        bar = progress.bar("steady run", total)
        load = run_load(engine, topic=topic, rate=sizes.steady_rate,
                        seconds=sizes.steady_seconds, threads=4, on_progress=bar.reach)
        bar.finish(load.events)
        procs.wait_drained(env, relay)  # then one more sample
        time.sleep(1.5)
    finally:
        stop.set()
        if sampler.is_alive():
            sampler.join()
        relay.stop()
        engine.dispose()
    if not samples:
        raise RuntimeError("steady run: no samples")
    first, last = samples[0], samples[-1]
    peak = max(samples, key=lambda s: s["total_bytes"])
    half = samples[len(samples) // 2]
    mib = 2**20
    section.rows.append(Row(
        NAME, f"steady {sizes.steady_rate:,} ev/s for {sizes.steady_seconds:.0f}s: table + indexes",
        f"{first['total_bytes'] / mib:.1f} -> {last['total_bytes'] / mib:.1f} MiB "
        f"(half-way {half['total_bytes'] / mib:.1f}, max {peak['total_bytes'] / mib:.1f})",
        note=(f"dead tuples at the end {last['dead_tuples']:,} (max "
              f"{max(s['dead_tuples'] for s in samples):,}); autovacuum ran "
              f"{last['autovacuum_count'] - first['autovacuum_count']} time(s), autoanalyze "
              f"{last['autoanalyze_count'] - first['autoanalyze_count']}; achieved "
              f"{load.achieved:,.0f} ev/s, backlog max {max(s['backlog'] for s in samples):,}"),
    ))
    section.details["steady"] = {
        "rate": sizes.steady_rate, "seconds": sizes.steady_seconds,
        "achieved": round(load.achieved, 1), "events": load.events,
        "samples": samples,
    }
