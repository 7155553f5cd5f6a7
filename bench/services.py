"""Notice when the shared services restart under a measurement, and wait for them to return.

On a shared development machine the test suite's fault tests restart
PostgreSQL and the Kafka broker (SIGKILL, immediate shutdown). A figure
measured across such a restart means nothing, so the runner takes a
fingerprint of both services before and after each measurement and runs it
again if either one changed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from bench.env import BenchEnv


@dataclass(frozen=True)
class Fingerprint:
    postgres_started: str | None
    kafka_processes: tuple[tuple[int, int], ...]  # (pid, start time in ticks) of kafka.Kafka JVMs

    def describe(self) -> str:
        return f"postgres since {self.postgres_started}, kafka pids {[p for p, _ in self.kafka_processes]}"


def fingerprint(env: BenchEnv) -> Fingerprint:
    try:
        with env.connect() as conn:
            row = conn.execute("SELECT pg_postmaster_start_time()::text").fetchone()
            started = str(row[0]) if row else None
    except Exception:
        started = None
    return Fingerprint(started, _kafka_processes(env.bootstrap_servers))


def _kafka_processes(servers: str) -> tuple[tuple[int, int], ...]:
    port = servers.split(",")[0].rpartition(":")[2]
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            if b"kafka.Kafka" not in cmdline:
                continue
            config = cmdline.split(b"\0")[-2] if cmdline.endswith(b"\0") else b""
            if config.endswith(b".properties") and port.encode() not in Path(config.decode()).read_bytes():
                continue  # another broker (e.g. the devstack's 3-node cluster)
            stat = (entry / "stat").read_text()
            found.append((int(entry.name), int(stat[stat.rindex(")") + 2:].split()[19])))
        except (OSError, ValueError, IndexError):
            continue
    return tuple(sorted(found))


def wait_until_up(env: BenchEnv, timeout: float = 180.0) -> None:
    """Until PostgreSQL answers and the broker serves metadata."""
    from kafka import KafkaConsumer

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with env.connect() as conn:
                conn.execute("SELECT 1")
            consumer = KafkaConsumer(bootstrap_servers=env.bootstrap_servers,
                                     request_timeout_ms=5000)
            try:
                consumer.topics()
            finally:
                consumer.close()
            return
        except Exception as exc:
            last = exc
            time.sleep(2)
    raise RuntimeError(f"services did not come back within {timeout}s: {last}")
