"""How big and how long each measurement is, for `--quick` and for the full run."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, kw_only=True)
class Sizes:
    mode: str  # "quick" or "full"
    # 1. write cost
    write_threads: int = 4
    write_seconds: float = 10.0  # per variant and repetition
    write_repeats: int = 3  # variants are interleaved: A B C, A B C, ...
    # 2. relay throughput
    relay_events: int = 1_000_000
    relay_batch_size: int = 500  # the relay's default
    relay_repeats: int = 1  # each relay/raw pair, interleaved; the best of each is reported
    # 2d. relay CPU at a steady rate (each publisher, LISTEN and polling)
    steady_cpu_rate: int = 500  # events/s offered, one per transaction
    steady_cpu_seconds: float = 30.0
    # 2e. WAL per event (transactions of 500; the one-event case writes a sixth of it)
    wal_events: int = 30_000
    wal_repeats: int = 2  # the least of these is reported
    # 3. backlog scale
    backlog_sizes: tuple[int, ...] = (10_000, 1_000_000, 10_000_000)
    backlog_measured: int = 100_000  # events drained and timed from each backlog
    steady_seconds: float = 150.0  # writers + relay, for bloat
    steady_rate: int = 1000  # events/s offered by the writers during the steady run
    # 4. latency: (offered events/s, events per transaction, seconds)
    latency_loads: tuple[tuple[int, int, float], ...] = ((500, 1, 30.0), (5000, 10, 10.0))
    # 5. consumer throughput
    consumer_messages: int = 50_000
    # 6. scale-out
    scaleout_events: int = 300_000
    scaleout_relays: tuple[int, ...] = (1, 2, 4)
    extra: dict[str, object] = field(default_factory=dict)


FULL = Sizes(mode="full")

QUICK = Sizes(
    mode="quick",
    write_seconds=2.5,
    write_repeats=2,
    relay_events=15_000,
    relay_repeats=3,
    backlog_sizes=(10_000, 100_000),
    backlog_measured=10_000,
    steady_seconds=15.0,
    steady_rate=500,
    steady_cpu_seconds=10.0,
    wal_events=6_000,
    wal_repeats=1,
    latency_loads=((200, 1, 10.0),),
    consumer_messages=4_000,
    scaleout_events=12_000,
)
