"""2d. Relay CPU at a steady rate: CPU seconds per 1,000 events, rounds per second.

Issue 11 asks for the relay's CPU per event at a steady 500 events/s, beside
a Kafka Connect worker's (0.09-0.14 s per 1,000 events in its Debezium
measurement), for both publishers, so that scale-out can be planned. Paced
writers (bench/load.py, one event per transaction) offer `steady_cpu_rate`
events/s for `steady_cpu_seconds` while one relay process (`python -m relay`)
publishes them, woken by LISTEN/NOTIFY (the default) and polling only. The
relay's CPU comes from its own /proc entries (every thread: the loop, the
client's network thread, the deleter); its rounds from its own metrics
endpoint (`outbox_relay_batch_events`: one observation per batch sent).
"""

from __future__ import annotations

import uuid
from typing import Any

from bench import procs
from bench.env import BenchEnv
from bench.load import run_load
from bench.machine import CpuMeter
from bench.report import Row, Section
from bench.settings import Sizes
from harness.scrape import free_port, scrape

NAME = "2d relay CPU, steady rate"
MODES = (("LISTEN/NOTIFY", "true"), ("polling only", "false"))


def run(env: BenchEnv, sizes: Sizes) -> Section:
    section = Section(NAME)
    publishers = ["kafka-python"]
    try:
        import confluent_kafka  # noqa: F401

        publishers.append("confluent")
    except ImportError:
        pass
    cases: list[dict[str, Any]] = []
    engine = env.engine(pool_size=4)
    try:
        for publisher in publishers:
            for mode, listen in MODES:
                env.reset()
                case = _measure(env, engine, publisher=publisher, mode=mode, listen=listen,
                                rate=sizes.steady_cpu_rate, seconds=sizes.steady_cpu_seconds)
                cases.append(case)
                section.rows.append(Row(
                    NAME, f"{publisher}, {case['offered_per_s']:,} ev/s offered, {mode}",
                    f"{case['cpu_s_per_1000']:.3f} CPU s per 1,000 events",
                    note=(f"{case['rounds_per_s']:.0f} rounds/s of {case['events_per_round']:.1f} "
                          f"events; relay {case['relay_cores']:.3f} cores; writers achieved "
                          f"{case['achieved_per_s']:,.0f} ev/s"),
                ))
    finally:
        engine.dispose()
        env.reset()
    section.details = {"cases": cases}
    return section


def _measure(env: BenchEnv, engine: Any, *, publisher: str, mode: str, listen: str,
             rate: int, seconds: float) -> dict[str, Any]:
    topic = env.topic(f"cpu-{publisher}-{listen}")
    port = free_port()
    relay_id = f"bench-{env.run_id}-cpu-{uuid.uuid4().hex[:4]}"
    relay = procs.start_relay(env, relay_id, listen=listen, publisher=publisher,
                              metrics_port=str(port), metrics_host="127.0.0.1")
    try:
        procs.wait_for_leases(env, [relay], [relay_id])
        run_load(engine, topic=topic, rate=50, seconds=1.0, threads=1)  # warm: connections, metadata
        procs.wait_drained(env, relay)
        meter = CpuMeter(named={relay.pid: "relay"})
        rounds0, events0 = _batches(port)
        meter.start()
        load = run_load(engine, topic=topic, rate=rate, seconds=seconds, threads=4)
        procs.wait_drained(env, relay)
        usage = meter.stop()
        rounds1, events1 = _batches(port)
    finally:
        relay.stop()
    rounds, events = rounds1 - rounds0, events1 - events0
    relay_cores = usage.groups["relay"]
    return {
        "publisher": publisher, "mode": mode, "offered_per_s": rate,
        "achieved_per_s": round(load.achieved, 1), "events": int(events),
        "seconds": round(usage.seconds, 2), "rounds": int(rounds),
        "rounds_per_s": rounds / usage.seconds, "events_per_round": events / max(rounds, 1),
        "relay_cores": relay_cores,
        "cpu_s_per_1000": relay_cores * usage.seconds / max(events, 1) * 1000,
        "cpu": {"busy_share": round(usage.busy_share, 3),
                "cores_used": {k: round(v, 3) for k, v in usage.groups.items()}},
    }


def _batches(port: int) -> tuple[float, float]:
    """(batches sent, events in them) so far, from the relay's /metrics."""
    samples = scrape(f"http://127.0.0.1:{port}")
    return (sum(v for (name, _), v in samples.items() if name == "outbox_relay_batch_events_count"),
            sum(v for (name, _), v in samples.items() if name == "outbox_relay_batch_events_sum"))
