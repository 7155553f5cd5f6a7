"""1. Write cost: payment transactions/s with `outbox.publish` vs the same transactions without.

Two transactions, each through a SQLAlchemy ORM `Session` from
`write_threads` threads with a connection each; the outbox variants also
call `outbox.publish` in it:

capture (the target row)
    A card payment captured, as a payment service books it: INSERT the
    payment (created), UPDATE it to captured, UPDATE the merchant's balance
    (one of MERCHANTS accounts, so writers rarely wait for each other's row
    lock), and INSERT the two ledger lines of the double entry (one
    statement). Four statements.
minimal
    Only the INSERT and the UPDATE of the payment row: the benchmark's
    transaction before the capture was added, kept so that the figure stays
    comparable with earlier runs. With two statements, BEGIN and COMMIT, one
    more statement of any kind is a quarter more round trips: in one
    interleaved run on the 2-core development machine, adding a bare
    `SELECT 1` where `publish` would be already gave 0.87 of the throughput.
    Each statement here costs the writer more Python time (SQLAlchemy,
    through the Session) than `publish` does.

The variants run interleaved (A B C ..., A B C ..., ...) on freshly
truncated tables, so drift on a shared machine hits them alike. No relay
runs: this is the cost the writer pays.

The commit trigger sends one NOTIFY per transaction. PostgreSQL serialises
the commits of notifying transactions on one lock (the notification queue
is global), so each transaction is also run with `outbox.notify=off` as a
connection option, the way an application would set it per role or database.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Engine,
    Integer,
    MetaData,
    Table,
    Text,
    Uuid,
    func,
    insert,
    text,
    update,
)
from sqlalchemy.orm import Session

import outbox
from bench.env import EVENT_TYPE, BenchEnv
from bench.machine import CpuMeter, CpuUsage
from bench.report import Row, Section
from bench.settings import Sizes
from harness import progress

NAME = "1 write cost"
TARGET = 0.85

metadata = MetaData()
bench_payment = Table(
    "bench_payment",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("idempotency_key", Text, nullable=False, unique=True),
    Column("merchant", Text, nullable=False),
    Column("amount_minor", BigInteger, nullable=False),
    Column("currency", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("version", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)
bench_account = Table(
    "bench_account",
    metadata,
    Column("id", Text, primary_key=True),
    Column("currency", Text, nullable=False),
    Column("balance_minor", BigInteger, nullable=False),
    Column("version", Integer, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)
bench_ledger_line = Table(
    "bench_ledger_line",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("payment_id", Uuid, nullable=False, index=True),
    Column("account_id", Text, nullable=False),
    Column("amount_minor", BigInteger, nullable=False),  # debit < 0 < credit
    Column("currency", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)
MERCHANTS = 1000
CLEARING_ACCOUNT = "clearing-EUR"  # the other side of every capture; only INSERTed, never locked


@dataclass(frozen=True)
class Variant:
    label: str
    transaction: str  # "capture" or "minimal"
    publish: bool
    options: str | None = None  # libpq `options`, e.g. "-c outbox.notify=off"
    target: bool = False  # the row the target is read from

    def baseline(self) -> Variant:
        return next(v for v in VARIANTS if v.transaction == self.transaction and not v.publish)


NOTIFY_OFF = "-c outbox.notify=off"
VARIANTS = (
    Variant("capture, no outbox", "capture", publish=False),
    Variant("capture, publish, NOTIFY on (default)", "capture", publish=True, target=True),
    Variant("capture, publish, outbox.notify=off", "capture", publish=True, options=NOTIFY_OFF),
    Variant("minimal, no outbox", "minimal", publish=False),
    Variant("minimal, publish, NOTIFY on (default)", "minimal", publish=True),
    Variant("minimal, publish, outbox.notify=off", "minimal", publish=True, options=NOTIFY_OFF),
)


@dataclass
class Tally:
    transactions: int = 0
    seconds: float = 0.0
    durations: list[float] = field(default_factory=list)  # per transaction, sampled
    cpu: list[CpuUsage] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.transactions / self.seconds if self.seconds else 0.0


def pay(session: Session, *, transaction: str, publish: bool, topic: str) -> None:
    """One payment transaction's statements (the caller commits)."""
    payment_id = uuid.uuid4()
    merchant = f"m-{random.randrange(MERCHANTS):04d}"
    amount = 1250
    session.execute(insert(bench_payment).values(
        id=payment_id, idempotency_key=payment_id.hex, merchant=merchant, amount_minor=amount,
        currency="EUR", status="created", version=1,
    ))
    session.execute(
        update(bench_payment).where(bench_payment.c.id == payment_id)
        .values(status="captured", version=2, updated_at=func.now())
    )
    if transaction == "capture":
        session.execute(
            update(bench_account).where(bench_account.c.id == merchant)
            .values(balance_minor=bench_account.c.balance_minor + amount,
                    version=bench_account.c.version + 1, updated_at=func.now())
        )
        session.execute(insert(bench_ledger_line).values([
            {"payment_id": payment_id, "account_id": CLEARING_ACCOUNT, "amount_minor": -amount,
             "currency": "EUR"},
            {"payment_id": payment_id, "account_id": merchant, "amount_minor": amount,
             "currency": "EUR"},
        ]))
    if publish:
        outbox.publish(
            session, topic=topic, key=str(payment_id), type=EVENT_TYPE,
            data={"payment_id": str(payment_id), "merchant": merchant, "amount_minor": amount,
                  "currency": "EUR", "status": "captured", "version": 2},
            headers={"traceparent": f"00-{payment_id.hex}-{payment_id.hex[:16]}-01"},
        )


def run_slice(engine: Engine, variant: Variant, *, threads: int, seconds: float,
              topic: str) -> tuple[int, float, list[float], CpuUsage]:
    """`threads` closed-loop writers for `seconds`; returns (transactions, elapsed, durations, cpu)."""
    counts = [0] * threads
    durations: list[list[float]] = [[] for _ in range(threads)]
    barrier = threading.Barrier(threads + 1)
    box: dict[str, float] = {}

    def work(index: int) -> None:
        barrier.wait()
        stop_at = box["stop_at"]
        n = 0
        mine = durations[index]
        while True:
            started = time.perf_counter()
            if started >= stop_at:
                break
            with Session(engine) as session, session.begin():
                pay(session, transaction=variant.transaction, publish=variant.publish, topic=topic)
            if n % 10 == 0:
                mine.append(time.perf_counter() - started)
            n += 1
        counts[index] = n

    workers = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    meter = CpuMeter()
    meter.start()
    started = time.perf_counter()
    box["stop_at"] = started + seconds
    barrier.wait()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - started
    return sum(counts), elapsed, [d for ds in durations for d in ds], meter.stop()


def run(env: BenchEnv, sizes: Sizes) -> Section:
    section = Section(NAME)
    topic = f"bench-{env.run_id}-write"  # rows only; no relay runs, nothing reaches Kafka
    setup = env.engine()
    metadata.create_all(setup)
    setup.dispose()
    engines = {v.label: env.engine(pool_size=sizes.write_threads, options=v.options)
               for v in VARIANTS}
    tallies = {v.label: Tally() for v in VARIANTS}
    slices = sizes.write_repeats * len(VARIANTS)
    bar = progress.bar(NAME, slices)
    try:
        for variant in VARIANTS:  # warm the pools and the plans; not counted
            _truncate(env)
            run_slice(engines[variant.label], variant, threads=sizes.write_threads,
                      seconds=min(1.0, sizes.write_seconds), topic=topic)
        done = 0
        for _ in range(sizes.write_repeats):
            for variant in VARIANTS:
                _truncate(env)
                n, elapsed, durations, cpu = run_slice(
                    engines[variant.label], variant, threads=sizes.write_threads,
                    seconds=sizes.write_seconds, topic=topic,
                )
                tally = tallies[variant.label]
                tally.transactions += n
                tally.seconds += elapsed
                tally.durations += durations
                tally.cpu.append(cpu)
                done += 1
                bar.reach(done, note=f"{variant.label}: {n / elapsed:,.0f} tx/s")
        bar.finish(done)
    finally:
        for engine in engines.values():
            engine.dispose()
        _truncate(env)

    for variant in VARIANTS:
        tally = tallies[variant.label]
        section.details[variant.label] = _details(tally)
        if not variant.publish:
            continue
        base = tallies[variant.baseline().label]
        section.rows.append(Row(
            measurement=NAME,
            case=f"{variant.label}, {sizes.write_threads} threads",
            result=f"{tally.rate:,.0f} tx/s",
            value=tally.rate,
            limit=base.rate,
            limit_case=f"tx/s of the same {variant.transaction} transaction without the outbox",
            # Both transactions are held to the target, so the minimal one's
            # miss stays in the table next to the capture's figure.
            target=TARGET,
            note=_note(tally, base) + ("; the issue's target row" if variant.target else ""),
        ))
    section.details["threads"] = sizes.write_threads
    section.details["seconds_per_slice"] = sizes.write_seconds
    section.details["repeats"] = sizes.write_repeats
    section.details["transaction"] = {
        "capture": (
            "INSERT bench_payment + UPDATE it + UPDATE bench_account (1 of "
            f"{MERCHANTS} merchants) + INSERT 2 bench_ledger_line rows in one statement"
        ),
        "minimal": "INSERT bench_payment + UPDATE it",
        "publish": "outbox.publish of one ~190-byte JSON event with a traceparent header",
        "session": "ORM Session, one connection per thread",
    }
    return section


def _truncate(env: BenchEnv) -> None:
    with env.connect() as conn:
        conn.execute(text("TRUNCATE bench_payment, bench_ledger_line, bench_account").text)
        conn.execute(
            "INSERT INTO bench_account (id, currency, balance_minor, version)"
            " SELECT %(clearing)s, 'EUR', 0, 1 UNION ALL"
            " SELECT 'm-' || lpad(g::text, 4, '0'), 'EUR', 0, 1 FROM generate_series(0, %(last)s) AS g",
            {"clearing": CLEARING_ACCOUNT, "last": MERCHANTS - 1},
        )
    env.reset()


def _details(tally: Tally) -> dict[str, Any]:
    durations = sorted(tally.durations) or [0.0]
    return {
        "transactions": tally.transactions,
        "seconds": round(tally.seconds, 2),
        "tx_per_s": round(tally.rate, 1),
        "tx_ms_p50": round(1000 * statistics.median(durations), 2),
        "tx_ms_p99": round(1000 * durations[int(0.99 * (len(durations) - 1))], 2),
        "cpu": [c.as_dict() for c in tally.cpu],
    }


def _note(tally: Tally, base: Tally) -> str:
    mine = sorted(tally.durations) or [0.0]
    theirs = sorted(base.durations) or [0.0]
    busy = statistics.mean(c.busy_share for c in tally.cpu) if tally.cpu else 0.0
    return (
        f"median transaction {1000 * statistics.median(mine):.2f} ms vs "
        f"{1000 * statistics.median(theirs):.2f} ms without; machine {busy:.0%} busy"
    )
