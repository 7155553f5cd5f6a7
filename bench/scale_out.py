"""6. Scale-out: 1, 2 and 4 relay processes (`python -m relay`) draining one backlog.

The relays are started first, against an empty outbox, and given time to
share the 16 key shards. Then the backlog is committed in one transaction
(with the relay's wake-up NOTIFY) and the clock runs from that COMMIT until
the `published` counter has grown by the backlog. Each relay's share comes
from its own "relay stopped: N events published" log line.

On a 2-core machine the relays compete with PostgreSQL and the broker for
the same cores; the CPU figures say when the machine, not the kit, is the
limit.
"""

from __future__ import annotations

import re
import time

from bench import procs
from bench.env import BenchEnv
from bench.machine import CpuMeter
from bench.report import Row, Section
from bench.settings import Sizes
from harness import progress

NAME = "6 scale-out"
_STOPPED = re.compile(r"relay stopped: (\d+) events published")


def run(env: BenchEnv, sizes: Sizes) -> Section:
    section = Section(NAME)
    events = sizes.scaleout_events
    single = 0.0
    cases = []
    for count in sizes.scaleout_relays:
        env.reset()
        topic = env.topic(f"scale{count}")
        ids = [f"bench-{env.run_id}-r{count}-{i}" for i in range(count)]
        relays = [procs.start_relay(env, relay_id, log_level="INFO") for relay_id in ids]
        shares: list[int] = []
        try:
            procs.wait_for_leases(env, relays, ids)
            with env.connect() as conn:
                base = env.published(conn)
            bar = progress.bar(f"{count} relay(s)", events)
            meter = CpuMeter(named={r.pid: f"relay{i}" for i, r in enumerate(relays)})
            fill = env.fill(topic, events, chunk=events, notify=True)
            meter.start()
            started = time.perf_counter()
            with env.connect() as conn:
                while (done := env.published(conn) - base) < events:
                    for relay in relays:
                        relay.check_alive()
                    bar.reach(done)
                    if time.perf_counter() - started > 1800:
                        raise RuntimeError(f"{count} relays: only {done} of {events} in 30 min")
                    time.sleep(0.05)
            elapsed = time.perf_counter() - started
            cpu = meter.stop()
            bar.finish(events)
        finally:
            for relay in relays:
                relay.stop()
                match = _STOPPED.search(relay.tail(50))
                shares.append(int(match.group(1)) if match else -1)
        rate = events / elapsed
        single = single or rate
        cases.append({"relays": count, "seconds": round(elapsed, 2), "events_per_s": round(rate, 1),
                      "published_by_each": shares, "fill": fill.describe(), "cpu": cpu.as_dict()})
        section.rows.append(Row(
            NAME, f"{count} relay process(es), {events:,} events",
            f"{rate:,.0f} ev/s", rate, single, "ev/s with one relay",
            note=f"each published {shares}; {cpu.describe()}",
        ))
    section.details["cases"] = cases
    env.reset()
    return section
