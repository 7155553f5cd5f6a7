"""The fault-injection suite: the payments system with several relays and
several ledger consumers on a 3-broker Kafka cluster (replication factor 3,
min.insync.replicas 2), while a seeded controller breaks things underneath:

    kill-relay       SIGKILL a relay, start it again
    kill-ledger      SIGKILL a ledger consumer, start it again
    pause-relay      SIGSTOP a relay for longer than its shard lease, then SIGCONT
    pause-ledger     SIGSTOP a ledger for longer than its group session, then SIGCONT
    kill-broker      SIGKILL one Kafka broker, start it again
    pause-broker     SIGSTOP one broker for longer than a lease and its broker session
                     (it stops answering but keeps its connections: a partition's face)
    restart-db       crash PostgreSQL (immediate stop) and start it again
    cut-connections  terminate every database connection of the relays and ledgers

At the end every invariant must hold, and the run prints a table: committed
payments, events published, postings, lost, applied twice, per-key order
violations, books balanced, and per fault the time until every event
committed before it had been applied (recovery).

CI runs a short version (`make test`); the long one is

    OUTBOX_FAULTS_SECONDS=600 make faults        # seed: OUTBOX_FAULTS_SEED (default 2026)

and the one at scale (102,000 payments, at least 30 faults of every kind: 58 minutes here,
the table in docs/faults-at-scale.md)

    OUTBOX_FAULTS_SECONDS=3400 OUTBOX_FAULTS_RATE=30 OUTBOX_FAULTS_WORKERS=8 \
    OUTBOX_FAULTS_PER_KIND=30 .venv/bin/pytest -q -m faults tests/integration/test_faults.py

(not `make faults`, which would hold the RabbitMQ suite to the same counts).
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from examples.payments.system import Outcome, PaymentsSystem
from outbox.config import env_float, env_int
from tests import services

pytestmark = [pytest.mark.integration, pytest.mark.faults]

# Read as the kit reads its own settings: a wrong value names its variable.
SECONDS = env_float("OUTBOX_FAULTS_SECONDS", 60.0, minimum=1.0)
SEED = env_int("OUTBOX_FAULTS_SEED", 2026)
# Payments per second offered (about 3 events each); the long run may raise it.
RATE = env_float("OUTBOX_FAULTS_RATE", 20.0, minimum=0.1)
# Writer threads: each payment is four transactions in a row, so under faults one
# thread manages only a few per second; a higher rate needs more of them.
WORKERS = env_int("OUTBOX_FAULTS_WORKERS", 4, minimum=1)
# Faults of every kind at least this many times, however long that takes.
PER_KIND = env_int("OUTBOX_FAULTS_PER_KIND", 1, minimum=1)
RELAYS, LEDGERS = 3, 2
LEASE_TTL = 3.0


@dataclass
class Fault:
    kind: str
    target: str
    at: float  # time.time() when injected
    recovery: float | None = None


class Controller:
    """Injects one fault at a time, at seeded random moments, and records it."""

    KINDS = ("kill-relay", "kill-ledger", "pause-relay", "pause-ledger", "kill-broker",
             "pause-broker", "restart-db", "cut-connections")

    def __init__(self, system: PaymentsSystem, rng: random.Random, database_url: str) -> None:
        self.system, self.rng = system, rng
        self.admin = create_engine(database_url, pool_pre_ping=True)
        self.faults: list[Fault] = []
        self._cycle: list[str] = []

    def next_kind(self) -> str:
        # Every kind once per cycle, in a seeded order: short runs still see them all.
        if not self._cycle:
            self._cycle = list(self.KINDS)
            self.rng.shuffle(self._cycle)
        return self._cycle.pop()

    def fewest_of_a_kind(self) -> int:
        counts = Counter(f.kind for f in self.faults)
        return min(counts[k] for k in self.KINDS)

    def inject(self, kind: str) -> Fault:
        """Break something, wait until the chain has caught up again, return the record."""
        committed = self.system.committed_events()
        fault = self._inject(kind)
        fault.recovery = self._wait_recovered(fault.at, committed)
        return fault

    def _wait_recovered(self, at: float, committed: int, timeout: float = 120) -> float | None:
        """Seconds from the fault until every event committed before it was applied
        and an event committed after it was applied too."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with self.admin.connect() as conn:
                    before, after = conn.execute(text(
                        "SELECT count(*) FILTER (WHERE event_time <= to_timestamp(:t)),"
                        "       count(*) FILTER (WHERE event_time > to_timestamp(:t))"
                        " FROM ledger.applied_event"
                    ), {"t": at}).one()
            except Exception:  # the database may be the thing that is restarting
                before = after = -1
            # Caught up on what was committed before, and delivering what came after.
            if before >= committed and after > 0:
                return time.time() - at
            time.sleep(0.2)
        return None

    def _inject(self, kind: str) -> Fault:
        rng, system = self.rng, self.system
        at = time.time()
        if kind == "kill-relay":
            victim = rng.choice(system.relays)
            victim.kill()
            victim.start()
        elif kind == "kill-ledger":
            victim = rng.choice(system.ledgers)
            victim.kill()
            victim.start()
        elif kind == "pause-relay":
            victim = rng.choice(system.relays)
            victim.pause()
            time.sleep(LEASE_TTL + 2)
            victim.resume()
        elif kind == "pause-ledger":
            victim = rng.choice(system.ledgers)
            victim.pause()
            time.sleep(12)  # longer than the ledger's 10 s group session
            victim.resume()
        elif kind == "kill-broker":
            node = rng.randint(1, 3)
            services.kill_broker(node)
            time.sleep(2)
            services.start_broker(node)
            return self._record(Fault(kind, f"broker-{node}", at))
        elif kind == "pause-broker":
            node = rng.randint(1, 3)
            services.pause_broker(node, LEASE_TTL + 5)
            return self._record(Fault(kind, f"broker-{node}", at))
        elif kind == "restart-db":
            services.restart_postgres()
            return self._record(Fault(kind, "postgres", at))
        elif kind == "cut-connections":
            with self.admin.connect() as conn:
                conn.execute(text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    "   AND backend_type = 'client backend'"
                ))
            return self._record(Fault(kind, "all", at))
        return self._record(Fault(kind, victim.name, at))

    def _record(self, fault: Fault) -> Fault:
        self.faults.append(fault)
        return fault


def test_payments_system_under_injected_faults(
    database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    services.require_devstack("postgres")
    cluster = services.cluster_bootstrap_servers()  # starts the 3-broker cluster
    rng = random.Random(SEED)
    system = PaymentsSystem(
        database_url=database_url, bootstrap_servers=cluster, workdir=tmp_path,
        relays=RELAYS, ledgers=LEDGERS, partitions=6, replication=3,
        relay_env={"OUTBOX_RELAY_LEASE_TTL": str(LEASE_TTL), "OUTBOX_RELAY_BACKOFF_MAX": "2"},
    )
    controller = Controller(system, rng, database_url)
    try:
        outcome = run_under_faults(system, controller, seconds=SECONDS)
    finally:
        services.stop_cluster()
    check_and_report(outcome, controller, capsys, "faults-report.md", seconds=SECONDS)


def run_under_faults(
    system: PaymentsSystem, controller: Controller, *, seconds: float, ready_timeout: float = 60
) -> Outcome:
    """Start the system, write `seconds` of payments while `controller` injects every kind
    of fault at least once (more while the load runs), wait until all is applied."""
    try:
        system.prepare()
        system.start()
        system.wait_ready(timeout=ready_timeout)
        payments = int(seconds * RATE)
        writer = threading.Thread(
            target=system.write_payments, args=(payments,),
            kwargs={"workers": WORKERS, "seed": SEED, "rate": RATE, "progress": False},
        )
        started = time.monotonic()
        writer.start()
        time.sleep(3)
        # Every kind PER_KIND times, then more while the load runs.
        while controller.fewest_of_a_kind() < PER_KIND or (
            writer.is_alive() and time.monotonic() - started < seconds - 5
        ):
            controller.inject(controller.next_kind())
            time.sleep(controller.rng.uniform(1, 3))
        writer.join()
        assert system.wait_until_applied(timeout=180, progress=False), "the ledger never caught up"
        system.stop()
        return system.outcome()
    finally:
        system.stop()
        system.close()


def check_and_report(
    outcome: Outcome, controller: Controller, capsys: pytest.CaptureFixture[str], report: str, *,
    seconds: float, brokers: str = f"{RELAYS} / {LEDGERS} / 3 (RF 3, min ISR 2)",
) -> None:
    """Print the table, keep it in .devstack/`report`, and fail unless every invariant holds."""
    table = _table(outcome, controller.faults, brokers, seconds)
    with capsys.disabled():
        print("\n" + table)
    (services.REPO / ".devstack" / report).write_text(table + "\n")
    r = outcome.report
    assert r.violations == dict.fromkeys(r.violations, 0), table
    assert r.debits_minor == r.credits_minor
    assert outcome.backlog == 0 and outcome.parked == 0, table
    assert controller.fewest_of_a_kind() >= PER_KIND, table


def _table(outcome: Outcome, faults: list[Fault], brokers: str, seconds: float) -> str:
    r = outcome.report
    v = r.violations
    rows = [
        ("seed / load seconds", f"{SEED} / {seconds:.0f}"),
        ("relays / ledgers / brokers", brokers),
        ("committed payments", r.payments),
        ("events committed", outcome.committed_events),
        ("events published", outcome.published),
        ("events applied", r.events_applied),
        ("postings applied", r.postings),
        ("lost", v["committed event never applied"]),
        ("applied twice", v["event applied twice"]),
        ("per-key order violations", v["payment events applied out of commit order"]),
        ("books balanced", "yes" if r.debits_minor == r.credits_minor and
         not v["books do not balance (per currency)"] else "NO"),
        ("duplicates suppressed", outcome.counters.get("duplicates", 0)),
        ("faults", ", ".join(f"{k} {n}" for k, n in sorted(Counter(f.kind for f in faults).items()))),
    ]
    lines = ["| fault-injection run | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    lines += ["", "| # | fault | target | recovery (s) |", "|---|---|---|---|"]
    for i, f in enumerate(faults, 1):
        rec = "-" if f.recovery is None else f"{f.recovery:.1f}"
        lines.append(f"| {i} | {f.kind} | {f.target} | {rec} |")
    by_kind: dict[str, list[float]] = {}
    for f in faults:
        if f.recovery is not None:
            by_kind.setdefault(f.kind, []).append(f.recovery)
    lines += ["", "| fault | count | recovery max (s) |", "|---|---|---|"]
    lines += [f"| {k} | {len(vals)} | {max(vals):.1f} |" for k, vals in sorted(by_kind.items())]
    return "\n".join(lines)
