"""The relays the measurements run, on `harness.procs` (the tests' and the demo's
process helpers too), and waiting until they share the shards."""

from __future__ import annotations

import os
import time

from bench.env import BenchEnv
from harness import procs
from harness.procs import Child

__all__ = ["Child", "pids", "start_consumer", "start_relay", "wait_for_leases"]


def start_relay(env: BenchEnv, relay_id: str, *, log_level: str = "WARNING", **settings: str) -> Child:
    """`python -m relay` as a deployment runs it; `settings` are OUTBOX_RELAY_* values."""
    extra = {f"OUTBOX_RELAY_{k.upper()}": v for k, v in settings.items()}
    extra["OUTBOX_RELAY_ID"] = relay_id
    return procs.relay(relay_id, env.child_env(**extra), log_level=log_level).start()


def start_consumer(env: BenchEnv, name: str, args: list[str]) -> Child:
    """`python -m harness.consumer_proc ARGS`, the kit's `Consumer` until SIGTERM."""
    return procs.consumer(name, args, env.child_env()).start()


def wait_for_leases(env: BenchEnv, relays: list[Child], ids: list[str], timeout: float = 60.0) -> None:
    """Until each relay holds its fair share of the shards (16 / relays, rounded up or down)."""
    from outbox.schema import SHARDS

    low = SHARDS // len(ids)
    deadline = time.monotonic() + timeout
    with env.connect() as conn:
        while True:
            for relay in relays:
                relay.check_alive()
            owned = dict(conn.execute(
                "SELECT owner, count(*) FROM outbox_relay_lease WHERE expires_at > now() "
                "GROUP BY owner"
            ).fetchall())
            if all(owned.get(i, 0) >= low for i in ids) and sum(owned.values()) == SHARDS:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"relays did not share the shards within {timeout}s: {owned}")
            time.sleep(0.2)


def wait_drained(env: BenchEnv, relay: Child, timeout: float = 60.0) -> None:
    """Until the relay has published the whole backlog; it must stay alive meanwhile."""
    deadline = time.monotonic() + timeout
    with env.connect() as conn:
        while (left := env.backlog(conn)) > 0:
            relay.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"the relay left {left} events after {timeout}s")
            time.sleep(0.2)


def pids(children: list[Child]) -> set[int]:
    return {c.pid for c in children} | {os.getpid()}
