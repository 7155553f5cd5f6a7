"""2e. WAL per 1,000 events: the kit's write and drain against an insert-only outbox.

Issue 11 sets the kit beside Debezium's outbox: its writers INSERT one row
per event into a table of Debezium's shape (id, aggregatetype, aggregateid,
type, jsonb payload) and logical decoding reads the WAL; no row is updated,
and deleting them is left to the application. The kit writes more: the
commit trigger numbers each row with an UPDATE at COMMIT (a second version
of the row, and its entries in the primary key and the position index; the
INSERT already put one in the pending index), and the relay deletes what
was published and counts it. Each case writes `wal_events` events of the
same JSON document through SQLAlchemy connections, in transactions of 500
and of one event, and takes `pg_current_wal_lsn()` before and after; the
least of `wal_repeats` runs is reported (the server is the bench's own, but
a checkpoint in the middle of a run adds full-page images to it). With
pg_walinspect (`make bench-db` installs it) the WAL is also split by record
type, which is where each kilobyte comes from.

The kit's write is measured twice: with the table's fillfactor from
migration 0003 (room on each page for the trigger's UPDATE) and with it set
back to 100 for the run, which is what 0003 changed.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from sqlalchemy import Connection, text

import outbox
from bench.env import BenchEnv
from bench.relay_throughput import NullPublisher, drain_with_relay
from bench.report import Row, Section
from bench.settings import Sizes

NAME = "2e WAL per event"
TARGET = 1 / 1.5  # the kit's WAL at most 1.5 times the insert-only outbox's
KEYS = 1000
DOCUMENT = {"payment_id": "", "merchant": "m-0042", "amount": "1234.56", "currency": "EUR",
            "status": "captured", "card": "visa", "note": "x" * 64}  # ~200 bytes as JSON

_DEBEZIUM_TABLE = """
CREATE TABLE IF NOT EXISTS bench_debezium_outbox (
    id uuid PRIMARY KEY,
    aggregatetype varchar(255) NOT NULL,
    aggregateid varchar(255) NOT NULL,
    type varchar(255) NOT NULL,
    payload jsonb
)
"""
_DEBEZIUM_INSERT = text(
    "INSERT INTO bench_debezium_outbox VALUES (:id, 'payment', :key, 'payment.captured', CAST(:doc AS jsonb))"
)


def run(env: BenchEnv, sizes: Sizes) -> Section:
    section = Section(NAME)
    events = sizes.wal_events
    engine = env.engine(pool_size=1)
    cases: list[dict[str, Any]] = []
    try:
        with env.connect() as conn:
            conn.execute(_DEBEZIUM_TABLE)
            walinspect = _walinspect(conn)
            for per_tx in (500, 1):
                n = events if per_tx > 1 else max(events // 6, 1000)
                measured = {
                    "insert-only outbox": _least(sizes.wal_repeats, _insert_only, env, conn, engine,
                                                 n, per_tx, walinspect),
                    "kit write": _least(sizes.wal_repeats, _kit, env, conn, engine, n, per_tx, walinspect,
                                        drain=True),
                }
                with _fillfactor(conn, 100):
                    measured["kit write, fillfactor 100"] = _least(
                        sizes.wal_repeats, _kit, env, conn, engine, n, per_tx, walinspect)
                baseline = measured["insert-only outbox"]["kib_per_1000"]
                for case, figures in measured.items():
                    figures.update(case=case, events=n, per_transaction=per_tx)
                    cases.append(figures)
                kit_total = measured["kit write"]["kib_per_1000"] + measured["kit write"]["drain_kib_per_1000"]
                section.rows.append(Row(
                    NAME, f"kit write + relay drain, {per_tx} per tx, against an insert-only outbox",
                    f"{kit_total:,.0f} KiB per 1,000 events", value=kit_total, limit=baseline,
                    limit_case="KiB, insert-only outbox of Debezium's shape", lower_is_better=True,
                    target=TARGET, note=_note(measured),
                ))
    finally:
        engine.dispose()
        env.reset()
        with env.connect() as conn:
            conn.execute("DROP TABLE IF EXISTS bench_debezium_outbox")
    section.details = {"cases": cases, "walinspect": walinspect}
    return section


def _note(measured: dict[str, dict[str, Any]]) -> str:
    kit, old = measured["kit write"], measured["kit write, fillfactor 100"]
    top = ", ".join(f"{name} {kib:,.0f}" for name, kib in kit.get("by_record", [])[:4])
    return (f"write {kit['kib_per_1000']:,.0f} (fillfactor 100: {old['kib_per_1000']:,.0f}) + drain "
            f"{kit['drain_kib_per_1000']:,.0f} KiB" + (f"; write by record: {top}" if top else ""))


def _write(add: Callable[[Connection, int], None], env: BenchEnv, conn: psycopg.Connection[Any], engine: Any,
           events: int, per_tx: int, walinspect: bool, *, drain: bool = False) -> dict[str, Any]:
    """Commit `events` rows written by `add`, `per_tx` per transaction; the WAL it took
    (and, with `drain`, what the relay then wrote deleting them, no broker)."""
    env.reset()
    conn.execute("TRUNCATE bench_debezium_outbox")
    start = _lsn(conn)
    with engine.connect() as c:
        for first in range(0, events, per_tx):
            with c.begin():
                for i in range(first, min(first + per_tx, events)):
                    add(c, i)
    end = _lsn(conn)
    figures: dict[str, Any] = _figures(conn, start, end, events, walinspect)
    if drain:
        start = _lsn(conn)
        drain_with_relay(env, events, publisher=NullPublisher(), label="drain (no broker)")
        figures["drain_kib_per_1000"] = _figures(conn, start, _lsn(conn), events, False)["kib_per_1000"]
    return figures


def _kit(c: Connection, i: int) -> None:
    outbox.publish(c, topic="bench-wal", key=f"key-{i % KEYS}", type="payment.captured",
                   data={**DOCUMENT, "payment_id": str(i)})


def _insert_only(c: Connection, i: int) -> None:
    c.execute(_DEBEZIUM_INSERT, {"id": uuid.uuid4(), "key": f"key-{i % KEYS}",
                                 "doc": json.dumps({**DOCUMENT, "payment_id": str(i)})})


def _least(repeats: int, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """`_write` `repeats` times; the run that wrote least (other load only adds)."""
    runs = [_write(*args, **kwargs) for _ in range(max(repeats, 1))]
    return min(runs, key=lambda f: float(f["kib_per_1000"]))


def _figures(conn: psycopg.Connection[Any], start: str, end: str, events: int, walinspect: bool) -> dict[str, Any]:
    scale = 1000 / 1024 / events
    row = conn.execute("SELECT pg_wal_lsn_diff(%s::pg_lsn, %s::pg_lsn)", (end, start)).fetchone()
    figures: dict[str, Any] = {"kib_per_1000": round(float(row[0] if row else 0) * scale, 1)}
    if walinspect:
        rows = conn.execute(
            'SELECT "resource_manager/record_type", count, fpi_size, combined_size '
            "FROM pg_get_wal_stats(%s::pg_lsn, %s::pg_lsn, true) WHERE count > 0 ORDER BY combined_size DESC",
            (start, end),
        ).fetchall()
        figures["by_record"] = [(name, round(size * scale, 1)) for name, _, _, size in rows]
        figures["records_per_1000"] = {name: round(count * 1000 / events) for name, count, _, _ in rows}
        figures["fpi_kib_per_1000"] = round(sum(fpi for _, _, fpi, _ in rows) * scale, 1)
    return figures


def _lsn(conn: psycopg.Connection[Any]) -> str:
    row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    return str(row[0]) if row else "0/0"


def _walinspect(conn: psycopg.Connection[Any]) -> bool:
    """Whether this role may split WAL by record type (pg_walinspect, granted by `make bench-db`)."""
    row = conn.execute(
        "SELECT to_regprocedure('pg_get_wal_stats(pg_lsn,pg_lsn,boolean)') IS NOT NULL "
        "AND has_function_privilege(to_regprocedure('pg_get_wal_stats(pg_lsn,pg_lsn,boolean)'), 'EXECUTE')"
    ).fetchone()
    return bool(row and row[0])


@contextmanager
def _fillfactor(conn: psycopg.Connection[Any], percent: int) -> Iterator[None]:
    """The outbox table's fillfactor set to `percent` for a block, then put back as it was."""
    row = conn.execute(
        "SELECT option_value FROM pg_options_to_table((SELECT reloptions FROM pg_class "
        "WHERE oid = 'outbox_event'::regclass)) WHERE option_name = 'fillfactor'"
    ).fetchone()
    conn.execute(f"ALTER TABLE outbox_event SET (fillfactor = {int(percent)})")
    try:
        yield
    finally:
        conn.execute("ALTER TABLE outbox_event RESET (fillfactor)" if row is None
                     else f"ALTER TABLE outbox_event SET (fillfactor = {int(row[0])})")
