"""What a block of work cost: CPU seconds of this process and WAL bytes, per 1,000 events.

CPU comes from the process's own `getrusage(RUSAGE_SELF)` (user + system,
every thread: kafka-python's sender, librdkafka's threads, the relay's
delete thread), so other load on the machine does not count, unlike the
machine-wide `CpuMeter` shares. WAL is `pg_current_wal_lsn()` before and
after: it is the whole server's, so writes to other databases on a shared
server land in it too (the bench's own server is otherwise quiet).
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from typing import Any

import psycopg


@dataclass
class Cost:
    cpu_seconds: float = 0.0
    wal_bytes: int = 0

    def per_1000(self, events: int) -> dict[str, float]:
        scale = 1000 / max(events, 1)
        return {"cpu_s_per_1000": round(self.cpu_seconds * scale, 4),
                "wal_kib_per_1000": round(self.wal_bytes / 1024 * scale, 1)}

    def describe(self, events: int) -> str:
        figures = self.per_1000(events)
        return (f"{figures['cpu_s_per_1000']:.3f} CPU s and {figures['wal_kib_per_1000']:,.0f} KiB "
                "of WAL per 1,000 events")


class CostMeter:
    """`start()`, the work, `stop()` -> `Cost`, on a connection of its own."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn
        self._cpu = 0.0
        self._lsn = ""
        self.last = Cost()  # what the last start/stop measured

    def start(self) -> None:
        self._lsn = self._current_lsn()
        self._cpu = _cpu_seconds()

    def stop(self) -> Cost:
        cpu = _cpu_seconds() - self._cpu
        row = self._conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s::pg_lsn)",
                                 (self._lsn,)).fetchone()
        self.last = Cost(cpu, int(row[0]) if row else 0)
        return self.last

    def _current_lsn(self) -> str:
        row = self._conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        return str(row[0]) if row else "0/0"


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
