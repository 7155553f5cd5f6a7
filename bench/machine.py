"""The machine, the versions and the settings a run was measured with, and a CPU meter.

`CpuMeter` reads /proc: machine-wide busy time, and the CPU seconds of the
process groups that matter here (this benchmark and its children, the
PostgreSQL server, the Kafka broker; the rest is `other`, for instance
somebody else's test run on a shared machine). It says whether a figure was
limited by the machine's cores rather than by the kit.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.env import BenchEnv

REPO = Path(__file__).resolve().parent.parent
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def describe(env: BenchEnv) -> dict[str, Any]:
    """Cores, memory, versions and service settings, for the results file."""
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "memory_gib": round(_meminfo_kib("MemTotal") / 1024 / 1024, 1),
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": {
            name: _version(name)
            for name in ("kafka-python", "crc32c", "SQLAlchemy", "psycopg", "confluent-kafka",
                         "tenacity")
        },
    }
    with env.connect() as conn:
        settings = {}
        for name in ("server_version", "shared_buffers", "synchronous_commit", "fsync",
                     "max_wal_size", "autovacuum_naptime", "max_connections",
                     "max_locks_per_transaction"):
            row = conn.execute(f"SHOW {name}").fetchone()
            settings[name] = row[0] if row else None
    info["postgres"] = settings
    info["kit_revision"] = _revision()
    info["kafka"] = {
        "broker_version": _broker_version_from_pom(),
        "api_version_seen_by_kafka_python": _api_version(env.bootstrap_servers),
        "partitions_per_topic": 4,
    }
    return info


def _revision() -> str | None:
    """The commit measured, and which kit files differed from it (work in progress)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                              capture_output=True, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--", "outbox", "relay",
                                 "migrations"], cwd=REPO, text=True, capture_output=True,
                                check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return None
    changed = sorted(line[3:] for line in status if line.strip())
    return head + (f" + uncommitted changes in {', '.join(changed)}" if changed else "")


def _meminfo_kib(field: str) -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _broker_version_from_pom() -> str | None:
    try:
        text = (REPO / "devstack" / "pom.xml").read_text()
    except OSError:
        return None
    match = re.search(r"<kafka.version>([^<]+)</kafka.version>", text)
    return f"{match.group(1)} (devstack/pom.xml)" if match else None


def _api_version(servers: str) -> str | None:
    """The broker version kafka-python derives from ApiVersions, e.g. "4.1"."""
    try:
        from kafka import KafkaProducer

        producer = KafkaProducer(bootstrap_servers=servers, client_id="outbox-bench")
        try:
            version = producer.config.get("api_version")
        finally:
            producer.close()
        return ".".join(str(v) for v in version) if version else None
    except Exception:
        return None


# -- CPU ------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuSnapshot:
    at: float
    busy: float  # machine-wide busy seconds (all cores)
    processes: dict[int, tuple[str, float]]  # pid -> (group, CPU seconds)


@dataclass(frozen=True)
class CpuUsage:
    seconds: float
    cores: int
    busy_cores: float  # average number of cores busy, machine-wide
    groups: dict[str, float]  # average cores used per group

    @property
    def busy_share(self) -> float:
        return self.busy_cores / max(self.cores, 1)

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in self.groups.items())
        return f"machine {self.busy_share:.0%} busy ({self.busy_cores:.2f}/{self.cores} cores: {parts})"

    def as_dict(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 2),
            "busy_share": round(self.busy_share, 3),
            "cores_used": {k: round(v, 3) for k, v in self.groups.items()},
        }


class CpuMeter:
    """`start()`, do the work, `stop()` -> average cores used, machine-wide and per group."""

    def __init__(self, extra_pids: set[int] | None = None, *,
                 named: dict[int, str] | None = None) -> None:
        # `named`: child processes reported as groups of their own (e.g. {pid: "relay"}).
        self._named = named or {}
        self._extra = (extra_pids or set()) | set(self._named)
        self._start: CpuSnapshot | None = None

    def start(self) -> None:
        self._start = self._snapshot()

    def stop(self) -> CpuUsage:
        end = self._snapshot()
        start = self._start or end
        seconds = max(end.at - start.at, 1e-9)
        cores = os.cpu_count() or 1
        busy = (end.busy - start.busy) / seconds
        groups = {"bench": 0.0, **{name: 0.0 for name in self._named.values()},
                  "postgres": 0.0, "kafka": 0.0}
        for pid, (group, cpu) in end.processes.items():
            before = start.processes.get(pid)
            used = cpu - before[1] if before is not None else cpu
            groups[group] += max(used, 0.0) / seconds
        # Processes that ended inside the window (short-lived backends) land here too.
        groups["other"] = max(busy - sum(groups.values()), 0.0)
        return CpuUsage(seconds, cores, busy, groups)

    def _snapshot(self) -> CpuSnapshot:
        at = time.monotonic()
        busy = 0.0
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
            values = [int(v) for v in fields]
            idle = values[3] + (values[4] if len(values) > 4 else 0)
            busy = (sum(values[:8]) - idle) / _TICK
        except (OSError, ValueError, IndexError):
            pass
        me = os.getpid()
        processes: dict[int, tuple[str, float]] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            comm = stat[stat.index("(") + 1: stat.rindex(")")]
            rest = stat[stat.rindex(")") + 2:].split()
            ppid = int(rest[1])
            cpu = (int(rest[11]) + int(rest[12])) / _TICK  # utime + stime
            if pid in self._named:
                processes[pid] = (self._named[pid], cpu)
            elif pid == me or ppid == me or pid in self._extra:
                processes[pid] = ("bench", cpu)
            elif comm == "postgres":
                processes[pid] = ("postgres", cpu)
            elif comm == "java" and _is_kafka(entry):
                processes[pid] = ("kafka", cpu)
        return CpuSnapshot(at, busy, processes)


def _is_kafka(entry: Path) -> bool:
    try:
        return b"kafka.Kafka" in (entry / "cmdline").read_bytes()
    except OSError:
        return False
