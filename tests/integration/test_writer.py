"""The write path against the real PostgreSQL: atomicity, commit order, bad input."""

from __future__ import annotations

import asyncio
import threading
import uuid
from decimal import Decimal

import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session

import outbox
from outbox.schema import outbox_event


def _count(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(outbox_event)).scalar_one()


def test_rollback_leaves_no_event(clean_db: Engine) -> None:
    with Session(clean_db) as session:
        outbox.publish(session, topic="payments", key="p-1", type="payment.created", data={"a": 1})
        session.flush()  # the row really reached the database before the rollback
        session.rollback()
    assert _count(clean_db) == 0


def test_commit_leaves_exactly_one_event(clean_db: Engine) -> None:
    with Session(clean_db) as session:
        event = outbox.publish(
            session, topic="payments", key="p-1", type="payment.created",
            data={"amount": "10.00"}, headers={"traceparent": "00-abc-01"},
        )
        session.commit()
    with clean_db.connect() as conn:
        rows = conn.execute(select(outbox_event)).all()
    assert len(rows) == 1
    row = rows[0]
    assert row.id == event.id
    assert row.position is not None  # numbered at commit
    assert row.payload == b'{"amount":"10.00"}'
    assert row.headers == {"traceparent": "00-abc-01"}


def test_business_failure_at_commit_leaves_no_event(clean_db: Engine) -> None:
    """An event is committed if and only if the business rows are, even when COMMIT fails."""
    with clean_db.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS test_biz"))
        conn.execute(text("CREATE TABLE test_biz (id int)"))
        conn.execute(text(
            "ALTER TABLE test_biz ADD CONSTRAINT uniq UNIQUE (id) DEFERRABLE INITIALLY DEFERRED"
        ))
    with pytest.raises(Exception), Session(clean_db) as session:  # noqa: B017
        session.execute(text("INSERT INTO test_biz VALUES (1), (2)"))
        session.execute(text("UPDATE test_biz SET id = 1 WHERE id = 2"))  # fails at COMMIT
        outbox.publish(session, topic="payments", key="p-1", type="t", data={})
        session.commit()
    assert _count(clean_db) == 0


def test_publish_on_a_connection_and_an_async_session(clean_db: Engine, database_url: str) -> None:
    with clean_db.begin() as conn:
        outbox.publish(conn, topic="payments", key="k", type="t", data=[1, 2])

    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    async def write() -> None:
        engine = create_async_engine(database_url)
        async with AsyncSession(engine) as session:
            outbox.publish(session, topic="payments", key="k", type="t", data={"async": True})
            await session.commit()
        async with engine.begin() as aconn:
            await outbox.publish_async(aconn, topic="payments", key="k", type="t", data=None)
        await engine.dispose()

    asyncio.run(write())
    assert _count(clean_db) == 3


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"data": {"amount": Decimal("1.00")}}, "data"),
        ({"data": float("nan")}, "data"),
        ({"topic": ""}, "topic"),
        ({"topic": "bad topic!"}, "topic"),
        ({"topic": "x" * 250}, "topic"),
        ({"key": ""}, "key"),
        ({"key": "   "}, "key"),
        ({"type": ""}, "type"),
        ({"type": 7}, "type"),
        ({"headers": {"ce_id": "x"}}, "headers"),
        ({"headers": {"n": b"bytes"}}, "headers"),
        ({"event_id": "not-a-uuid"}, "event_id"),
        ({"data": "x" * 2_000_000}, "data"),
        *[(fields, field) for fields, field, _ in [
            ({"topic": "payments\n"}, "topic", "a trailing newline"),
            ({"key": "p-\x001"}, "key", "NUL in the key"),
            ({"key": "p-\ud800"}, "key", "a lone surrogate in the key"),
            ({"type": "t\x00"}, "type", "NUL in the type"),
            ({"type": "t\udc80"}, "type", "a lone surrogate in the type"),
            ({"headers": {"h": "v\x00"}}, "headers", "NUL in a header value"),
            ({"headers": {"h\x00": "v"}}, "headers", "NUL in a header name"),
            ({"headers": {"h": "\ud800"}}, "headers", "a lone surrogate in a header value"),
            ({"data": {"memo": "\udfff"}}, "data", "a lone surrogate inside data"),
            ({"key": "k" * 2_000_000}, "key", "a key over the limit"),
            ({"headers": {"h": "v" * 2_000_000}}, "headers", "headers over the limit"),
            ({"max_payload_bytes": "10"}, "max_payload_bytes", "a str limit"),
            ({"max_payload_bytes": True}, "max_payload_bytes", "a bool limit"),
            ({"max_payload_bytes": 0}, "max_payload_bytes", "a zero limit"),
        ]],
    ],
)
def test_bad_input_raises_and_commits_nothing(
    clean_db: Engine, fields: dict[str, object], field: str
) -> None:
    good: dict[str, object] = {"topic": "payments", "key": "p-1", "type": "t", "data": {}}
    with Session(clean_db) as session:
        outbox.publish(session, **good)  # type: ignore[arg-type]
        with pytest.raises(outbox.InvalidEventError) as raised:
            outbox.publish(session, **{**good, **fields})  # type: ignore[arg-type]
        assert raised.value.field == field
        session.commit()
    assert _count(clean_db) == 1  # only the good event; the refused one left no trace


REFUSED_BY_THE_DATABASE = [
    pytest.param({"topic": "payments\n"}, id="topic-with-trailing-newline"),
    pytest.param({"key": "p-\x001"}, id="nul-in-key"),
    pytest.param({"key": "\ud800"}, id="surrogate-in-key"),
    pytest.param({"type": "t\x00"}, id="nul-in-type"),
    pytest.param({"headers": {"h": "v\x00"}}, id="nul-in-header-value"),
    pytest.param({"headers": {"h\x00": "v"}}, id="nul-in-header-name"),
    pytest.param({"headers": {"h": "\udc80"}}, id="surrogate-in-header-value"),
    pytest.param({"data": {"memo": "\ud800"}}, id="surrogate-in-data"),
    pytest.param({"max_payload_bytes": "10"}, id="limit-as-str"),
]


@pytest.fixture
def business_table(clean_db: Engine) -> Engine:
    with clean_db.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS test_payment"))
        conn.execute(text("CREATE TABLE test_payment (id text PRIMARY KEY)"))
    return clean_db


@pytest.mark.parametrize("fields", REFUSED_BY_THE_DATABASE)
@pytest.mark.parametrize("through", ["session", "connection"])
def test_a_refused_event_leaves_the_callers_transaction_usable(
    business_table: Engine, fields: dict[str, object], through: str
) -> None:
    """Each refusal is InvalidEventError raised before the session is touched: the payment
    row written before it and the event published after it still commit."""
    good: dict[str, object] = {"topic": "payments", "key": "p-1", "type": "t", "data": {}}
    if through == "session":
        with Session(business_table) as session:
            session.execute(text("INSERT INTO test_payment VALUES ('pay-1')"))
            with pytest.raises(outbox.InvalidEventError):
                outbox.publish(session, **{**good, **fields})  # type: ignore[arg-type]
            outbox.publish(session, **good)  # type: ignore[arg-type]
            session.commit()
    else:
        with business_table.begin() as conn:
            conn.execute(text("INSERT INTO test_payment VALUES ('pay-1')"))
            with pytest.raises(outbox.InvalidEventError):
                outbox.publish(conn, **{**good, **fields})  # type: ignore[arg-type]
            outbox.publish(conn, **good)  # type: ignore[arg-type]
    with business_table.connect() as conn:
        assert conn.execute(text("SELECT id FROM test_payment")).scalars().all() == ["pay-1"]
    assert _count(business_table) == 1


def test_nul_inside_json_data_is_stored_and_read_back(clean_db: Engine) -> None:
    """The payload is bytea and JSON escapes NUL as \\u0000, so data may hold it."""
    with Session(clean_db) as session:
        event = outbox.publish(session, topic="payments", key="k", type="t", data={"m": "a\x00b"})
        session.commit()
    with clean_db.connect() as conn:
        payload = conn.execute(
            select(outbox_event.c.payload).where(outbox_event.c.id == event.id)
        ).scalar_one()
    assert payload == b'{"m":"a\\u0000b"}'


def test_payload_limit_is_configurable(clean_db: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUTBOX_MAX_PAYLOAD_BYTES", "100")
    with Session(clean_db) as session, pytest.raises(outbox.PayloadTooLargeError) as raised:
        outbox.publish(session, topic="payments", key="k", type="t", data="x" * 200)
    assert raised.value.limit == 100
    assert "OUTBOX_MAX_PAYLOAD_BYTES" in str(raised.value)


def test_same_key_transactions_are_numbered_in_commit_order(clean_db: Engine) -> None:
    """T1 starts and writes first, T2 writes second but commits first: T2 comes first."""
    first = Session(clean_db)
    second = Session(clean_db)
    try:
        e1 = outbox.publish(first, topic="payments", key="p-42", type="authorised", data={})
        first.flush()
        e2 = outbox.publish(second, topic="payments", key="p-42", type="captured", data={})
        second.flush()
        second.commit()
        first.commit()
    finally:
        first.close()
        second.close()
    with clean_db.connect() as conn:
        order = conn.execute(
            select(outbox_event.c.id).order_by(outbox_event.c.position)
        ).scalars().all()
    assert order == [e2.id, e1.id]


def test_transactions_sharing_keys_in_opposite_order_do_not_deadlock(clean_db: Engine) -> None:
    """Keys are locked in sorted order at commit, so A-then-B and B-then-A both commit."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def write(keys: list[str]) -> None:
        try:
            for _ in range(20):
                with Session(clean_db) as session:
                    for key in keys:
                        outbox.publish(session, topic="payments", key=key, type="t", data={})
                    session.flush()
                    barrier.wait(timeout=10)
                    session.commit()
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=write, args=(k,)) for k in (["a", "b"], ["b", "a"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert _count(clean_db) == 80


def test_event_ids_are_uuids_and_can_be_chosen(clean_db: Engine) -> None:
    chosen = uuid.uuid4()
    with Session(clean_db) as session:
        event = outbox.publish(
            session, topic="payments", key="k", type="t", data=b"\x00raw", event_id=str(chosen)
        )
        session.commit()
    assert event.id == chosen
    assert event.content_type == "application/octet-stream"


def test_one_transaction_publishing_20000_distinct_keys_commits(clean_db: Engine) -> None:
    """The commit trigger locks key buckets, not keys: a big batch cannot exhaust the lock table."""
    with Session(clean_db) as session:
        for i in range(20_000):
            outbox.publish(session, topic="payments", key=f"k-{i}", type="t", data=i)
        session.commit()
    with clean_db.connect() as conn:
        numbered = conn.execute(
            select(func.count()).select_from(outbox_event).where(outbox_event.c.position.is_not(None))
        ).scalar_one()
    assert numbered == 20_000


def test_the_insert_goes_through_sqlalchemy_events_and_error_wrapping(clean_db: Engine) -> None:
    """`publish` skips the compile cache, not the Connection: cursor events see the INSERT,
    and a reused event id is SQLAlchemy's IntegrityError, as for any statement."""
    from sqlalchemy import event as sa_event
    from sqlalchemy.exc import IntegrityError

    seen: list[str] = []

    def record(conn: object, cursor: object, statement: str, *args: object) -> None:
        seen.append(statement)

    sa_event.listen(clean_db, "before_cursor_execute", record)
    try:
        chosen = uuid.uuid4()
        with Session(clean_db) as session:
            outbox.publish(session, topic="payments", key="k", type="t", data={}, event_id=chosen)
            with pytest.raises(IntegrityError):
                outbox.publish(session, topic="payments", key="k", type="t", data={}, event_id=chosen)
    finally:
        sa_event.remove(clean_db, "before_cursor_execute", record)
    assert sum("INSERT INTO outbox_event" in s for s in seen) == 2
    assert _count(clean_db) == 0


def test_publish_on_a_connection_with_a_schema_translate_map(clean_db: Engine) -> None:
    """A schema_translate_map needs SQLAlchemy's compiler; publish then uses the Core INSERT."""
    with clean_db.connect() as conn:
        conn = conn.execution_options(schema_translate_map={None: "public"})
        with conn.begin():
            event = outbox.publish(conn, topic="payments", key="k", type="t", data={"x": 1},
                                   headers={"h": "v"})
    with clean_db.connect() as conn:
        row = conn.execute(select(outbox_event).where(outbox_event.c.id == event.id)).one()
    assert (row.payload, row.headers) == (b'{"x":1}', {"h": "v"})
