"""1. Write cost: payment transactions/s with `outbox.publish` vs the same transactions without.

Each transaction inserts a payment row and updates it (created -> captured)
through a SQLAlchemy ORM `Session`, from `write_threads` threads with a
connection each; the outbox variants also call `outbox.publish` in it. The
variants run interleaved (A B C, A B C, ...) on freshly truncated tables, so
drift on a shared machine hits them alike. No relay runs: this is the cost
the writer pays.

The commit trigger sends one NOTIFY per transaction. PostgreSQL serialises
the commits of notifying transactions on one lock (the notification queue
is global), so the third variant turns it off with `outbox.notify=off` as a
connection option, the way an application would per role or database.
"""

from __future__ import annotations

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
from bench.progress import Progress
from bench.report import Row, Section
from bench.settings import Sizes

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


@dataclass(frozen=True)
class Variant:
    label: str
    publish: bool
    options: str | None = None  # libpq `options`, e.g. "-c outbox.notify=off"


BASELINE = Variant("no outbox", publish=False)
VARIANTS = (
    BASELINE,
    Variant("publish, NOTIFY on (default)", publish=True),
    Variant("publish, outbox.notify=off", publish=True, options="-c outbox.notify=off"),
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


def pay(session: Session, *, publish: bool, topic: str) -> None:
    """One payment transaction's statements (the caller commits)."""
    payment_id = uuid.uuid4()
    session.execute(insert(bench_payment).values(
        id=payment_id, idempotency_key=payment_id.hex, merchant="m-0042", amount_minor=1250,
        currency="EUR", status="created", version=1,
    ))
    session.execute(
        update(bench_payment).where(bench_payment.c.id == payment_id)
        .values(status="captured", version=2, updated_at=func.now())
    )
    if publish:
        outbox.publish(
            session, topic=topic, key=str(payment_id), type=EVENT_TYPE,
            data={"payment_id": str(payment_id), "merchant": "m-0042", "amount_minor": 1250,
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
                pay(session, publish=variant.publish, topic=topic)
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
    bar = Progress(NAME, slices)
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
                bar.update(done, note=f"{variant.label}: {n / elapsed:,.0f} tx/s")
        bar.close(done)
    finally:
        for engine in engines.values():
            engine.dispose()
        _truncate(env)

    base = tallies[BASELINE.label]
    for variant in VARIANTS:
        tally = tallies[variant.label]
        section.details[variant.label] = _details(tally)
        if variant is BASELINE:
            continue
        section.rows.append(Row(
            measurement=NAME,
            case=f"{variant.label}, {sizes.write_threads} threads",
            result=f"{tally.rate:,.0f} tx/s",
            value=tally.rate,
            limit=base.rate,
            limit_case="tx/s without the outbox",
            target=TARGET,
            note=_note(tally, base),
        ))
    section.details["threads"] = sizes.write_threads
    section.details["seconds_per_slice"] = sizes.write_seconds
    section.details["repeats"] = sizes.write_repeats
    section.details["transaction"] = (
        "INSERT bench_payment + UPDATE it (+ outbox.publish of one ~190-byte JSON event with a "
        "traceparent header), ORM Session, one connection per thread"
    )
    return section


def _truncate(env: BenchEnv) -> None:
    with env.connect() as conn:
        conn.execute(text("TRUNCATE bench_payment").text)
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
