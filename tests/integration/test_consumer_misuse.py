"""A consumer misused or misconfigured, against the real PostgreSQL and the real Kafka broker.

Handlers that break the handler contract (commit, roll back or close the
batch's transaction, by any road), messages the kit's `publish` could never
have written, a database that refuses the login or lacks the kit's tables,
and kafka-python logging a SASL password at DEBUG. Each test says what the
consumer must do instead of what it did before: refuse, fail loudly in one
line, or dead-letter, and never skip an event as a duplicate that was not
applied.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.admin import KafkaAdminClient
from kafka.errors import KafkaError
from sqlalchemy import Engine, create_engine, event, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from outbox import handler as handler_module
from outbox import migrate
from outbox.consumer import Consumer
from outbox.dead_letters import list_dead_letters, replay_dead_letters
from outbox.errors import ConfigError, HandlerContractError, SchemaError
from outbox.event import Event
from outbox.inbox import apply_event
from outbox.kafka_logging import _FILTER, KAFKA_WIRE_LOGGERS, protect_kafka_logs
from outbox.schema import outbox_inbox
from tests.consumer_proc import record_effect
from tests.integration.test_consumer import (
    FAST_CONFIG,
    FAST_KAFKA,
    FlakyProxy,
    cloud_event,
    committed,
    consumer_for,
    drain,
    effect_rows,
    handled,
    produce,
)

pytestmark = pytest.mark.integration


Misuse = Callable[[Session], object]


def _swallowed(call: Callable[[], object]) -> None:
    with contextlib.suppress(Exception):
        call()


def _dbapi(session: Session) -> Any:
    return session.connection().connection.dbapi_connection


# Every road a handler has to end the batch's transaction, and what the error names.
CONTRACT_BREAKS: dict[str, tuple[Misuse, str]] = {
    "session.commit": (lambda s: s.commit(), "called session.commit()"),
    "session.commit, error swallowed": (
        lambda s: _swallowed(s.commit), "called session.commit()"),
    "session.rollback": (lambda s: s.rollback(), "called session.rollback()"),
    "session.close": (lambda s: s.close(), "called session.close()"),
    "with session.begin()": (lambda s: s.begin(), "called session.begin()"),
    "connection.commit": (
        lambda s: s.connection().commit(), "called session.connection().commit()"),
    "transaction.commit": (
        lambda s: s.get_transaction().commit(),  # type: ignore[union-attr]
        "called commit() on the"),  # the database connection, or the session's transaction
    "COMMIT statement": (lambda s: s.execute(text("COMMIT")), "called COMMIT as a statement"),
    "COMMIT after a ;": (
        lambda s: s.connection().exec_driver_sql("SELECT 1; commit"),
        "called COMMIT as a statement"),
    "END statement": (lambda s: s.execute(text("end")), "called END as a statement"),
    "DBAPI commit": (lambda s: _dbapi(s).commit(), "called commit() on the database connection"),
    "pooled connection commit": (
        lambda s: s.connection().connection.commit(), "called commit() on the database connection"),
    "psycopg execute COMMIT": (
        lambda s: _dbapi(s).execute("COMMIT"), "called COMMIT as a statement"),
    "DBAPI rollback, then more work": (
        lambda s: (_dbapi(s).rollback(), s.execute(text("SELECT 1"))),
        "the transaction was rolled back while handler"),
}


def _ids(messages: list[tuple[uuid.UUID, Any]]) -> list[uuid.UUID]:
    return [event_id for event_id, _ in messages]


def inbox_ids(engine: Engine, group: str) -> set[uuid.UUID]:
    with engine.connect() as conn:
        return set(conn.execute(
            select(outbox_inbox.c.event_id).where(outbox_inbox.c.consumer_group == group)
        ).scalars())


def duplicate_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "duplicate event" in r.getMessage()]


# -- the handler contract --------------------------------------------------------


@pytest.mark.parametrize("misuse", list(CONTRACT_BREAKS), ids=list(CONTRACT_BREAKS))
def test_handler_ending_the_batch_transaction_is_refused_and_costs_no_other_event(
    misuse: str, effects: Engine, bootstrap_servers: str, topic: str, group: str,
    admin: KafkaAdminClient, caplog: pytest.LogCaptureFixture,
) -> None:
    # 13 messages in one poll and one transaction; the handler of the 7th
    # writes its effect and then ends the transaction. Before, its commit made
    # the inbox rows of all 13 durable: 1 effect, 12 "duplicate event skipped".
    caplog.set_level(logging.INFO, logger="outbox")
    break_it, what = CONTRACT_BREAKS[misuse]
    events = [cloud_event() for _ in range(13)]
    ids = _ids(events)
    offender = ids[6]
    produce(bootstrap_servers, topic, [(0, message) for _, message in events])

    def handler(session: Session, event: Event) -> None:
        record_effect(session, event)
        if event.id == offender:
            break_it(session)

    with consumer_for(effects, bootstrap_servers, group, topic, handler) as consumer:
        drain(consumer, lambda: handled(consumer) == 13)

    others = [event_id for event_id in ids if event_id != offender]
    assert effect_rows(effects, topic) == others  # each once, in order; none of the offender's
    stats = consumer.stats
    assert (stats.applied, stats.duplicates, stats.dead_lettered) == (12, 0, 1)
    assert stats.retries == FAST_CONFIG.max_attempts - 1
    assert duplicate_lines(caplog) == []
    assert inbox_ids(effects, group) == set(others)
    assert committed(admin, group) == {0: 13}
    with effects.connect() as conn:
        [letter] = list_dead_letters(conn, group)
    assert letter.event_id == offender and letter.attempts == FAST_CONFIG.max_attempts
    assert letter.error.startswith("outbox.errors.HandlerContractError: ")
    assert what in letter.error and "tests.integration.test_consumer_misuse" in letter.error


@pytest.mark.parametrize("misuse", ["session.commit", "connection.commit", "COMMIT statement",
                                    "DBAPI commit", "session.commit, error swallowed"])
def test_handler_ending_its_own_transaction_is_refused_one_message_per_transaction(
    misuse: str, effects: Engine, bootstrap_servers: str, topic: str, group: str,
    admin: KafkaAdminClient,
) -> None:
    # The alone path (a transaction per message, and every retry): the same refusal.
    break_it, what = CONTRACT_BREAKS[misuse]
    events = [cloud_event() for _ in range(3)]
    ids = _ids(events)
    produce(bootstrap_servers, topic, [(0, message) for _, message in events])

    def handler(session: Session, event: Event) -> None:
        record_effect(session, event)
        if event.id == ids[1]:
            break_it(session)

    config = dataclasses.replace(FAST_CONFIG, transaction_batch_size=1)
    with consumer_for(effects, bootstrap_servers, group, topic, handler,
                      config=config) as consumer:
        drain(consumer, lambda: handled(consumer) == 3)

    assert effect_rows(effects, topic) == [ids[0], ids[2]]
    assert (consumer.stats.applied, consumer.stats.duplicates,
            consumer.stats.dead_lettered) == (2, 0, 1)
    assert inbox_ids(effects, group) == {ids[0], ids[2]}
    with effects.connect() as conn:
        [letter] = list_dead_letters(conn, group)
    assert letter.event_id == ids[1] and what in letter.error
    assert committed(admin, group) == {0: 3}


# What SQLAlchemy's own events catch, for a driver whose connection takes no attributes.
SQLALCHEMY_LEVEL = [name for name in CONTRACT_BREAKS
                    if not name.startswith(("DBAPI", "pooled", "psycopg"))]


@pytest.mark.parametrize(
    ("guard_at", "misuse"),
    [("driver", name) for name in CONTRACT_BREAKS]
    + [("sqlalchemy events", name) for name in SQLALCHEMY_LEVEL],
)
def test_refused_misuse_commits_nothing_and_leaves_the_pooled_connection_clean(
    guard_at: str, misuse: str, database_url: str, group: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # apply_event alone (replay and the one-message path use it), on a pool of
    # one connection: whatever the handler did, the next user of that
    # connection must find no transaction left open with the inbox row in it.
    if guard_at == "sqlalchemy events":
        monkeypatch.setattr(handler_module, "_dbapi_guard", lambda dbapi, guard: (None, {}, {}))
    break_it, what = CONTRACT_BREAKS[misuse]
    engine = create_engine(database_url, pool_size=1, max_overflow=0)
    event_ = Event(id=uuid.uuid4(), topic="t", key="k", type="x", data={},
                   time=datetime.now(UTC), partition=0, offset=0)
    try:
        with pytest.raises(HandlerContractError) as raised, Session(engine) as session, \
                session.begin():
            apply_event(session, group=group, event=event_,
                        handler=lambda s, e: break_it(s))
        assert what in str(raised.value)
        with engine.connect() as conn:
            assert conn.execute(select(1)).scalar() == 1
            assert conn.connection.dbapi_connection.info.transaction_status == 2  # this one's
    finally:
        engine.dispose()
    assert inbox_ids(create_engine(database_url), group) == set()


def test_handler_committing_below_sqlalchemy_gets_its_batch_repaired_not_skipped(
    effects: Engine, bootstrap_servers: str, topic: str, group: str, admin: KafkaAdminClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # libpq's own connection is out of the guard's reach: the COMMIT happens,
    # with the inbox rows of all 13 events. The consumer notices it after the
    # handler, deletes the rows of the events whose handlers had not run, and
    # parks the offender at once (its effect before the COMMIT is durable: a
    # retry would write it twice). The 6 before it were committed with their
    # effects by that COMMIT: they are applied, once, and count as duplicates.
    caplog.set_level(logging.INFO, logger="outbox")
    events = [cloud_event() for _ in range(13)]
    ids = _ids(events)
    offender = ids[6]
    produce(bootstrap_servers, topic, [(0, message) for _, message in events])

    def handler(session: Session, event: Event) -> None:
        record_effect(session, event)
        if event.id == offender:
            _dbapi(session).pgconn.exec_(b"COMMIT")

    with consumer_for(effects, bootstrap_servers, group, topic, handler) as consumer:
        drain(consumer, lambda: handled(consumer) == 13)

    rows = effect_rows(effects, topic)
    assert sorted(rows) == sorted(ids) and len(rows) == 13  # every effect exactly once
    stats = consumer.stats
    assert (stats.applied, stats.duplicates, stats.dead_lettered, stats.retries) == (6, 6, 1, 0)
    assert inbox_ids(effects, group) == set(ids) - {offender}
    with effects.connect() as conn:
        [letter] = list_dead_letters(conn, group)
    assert letter.event_id == offender and letter.attempts == 1
    assert letter.error.startswith("outbox.consumer._EffectsCommitted: handler tests.")
    assert "committed the transaction itself, below SQLAlchemy" in letter.error
    assert committed(admin, group) == {0: 13}
    assert any("committed below SQLAlchemy" in r.getMessage() for r in caplog.records)


def test_replay_with_a_committing_handler_leaves_the_dead_letter_parked(
    effects: Engine, bootstrap_servers: str, topic: str, group: str,
) -> None:
    event_id, message = cloud_event()
    produce(bootstrap_servers, topic, [(0, message)])

    def failing(session: Session, event: Event) -> None:
        raise RuntimeError("bug")

    with consumer_for(effects, bootstrap_servers, group, topic, failing) as consumer:
        drain(consumer, lambda: consumer.stats.dead_lettered == 1)

    def committing(session: Session, event: Event) -> None:
        record_effect(session, event)
        session.commit()

    result = replay_dead_letters(effects, group=group, handler=committing)
    assert list(result.failed) and not result.applied
    assert "called session.commit()" in next(iter(result.failed.values()))
    assert effect_rows(effects, topic) == [] and inbox_ids(effects, group) == set()
    with effects.connect() as conn:
        [letter] = list_dead_letters(conn, group)
    assert letter.replayed_at is None and "session.commit()" in letter.error

    assert replay_dead_letters(effects, group=group, handler=record_effect).applied == [letter.id]
    assert effect_rows(effects, topic) == [event_id]


def test_handler_returning_a_coroutine_is_a_failure_not_an_application(
    effects: Engine, group: str
) -> None:
    # Passes the construction check (a plain lambda), returns an un-awaited coroutine.
    async def apply_later(session: Session, event: Event) -> None:
        record_effect(session, event)

    event_ = Event(id=uuid.uuid4(), topic="t", key="k", type="x", data={}, time=datetime.now(UTC),
                   partition=0, offset=0)
    with pytest.raises(HandlerContractError) as raised, Session(effects) as session, \
            session.begin():
        apply_event(session, group=group, event=event_,
                    handler=lambda s, e: apply_later(s, e))
    assert "returned coroutine instead of running" in str(raised.value)
    assert inbox_ids(effects, group) == set()


def test_savepoints_of_the_handler_own_are_allowed(
    effects: Engine, bootstrap_servers: str, topic: str, group: str,
) -> None:
    events = [cloud_event() for _ in range(3)]
    ids = _ids(events)
    produce(bootstrap_servers, topic, [(0, message) for _, message in events])

    def careful(session: Session, event: Event) -> None:
        with contextlib.suppress(Exception), session.begin_nested():
            session.execute(text("SELECT 1 / 0"))  # recovered by its own savepoint
        nested = session.begin_nested()
        record_effect(session, event)
        nested.commit()

    with consumer_for(effects, bootstrap_servers, group, topic, careful) as consumer:
        drain(consumer, lambda: handled(consumer) == 3)
    assert effect_rows(effects, topic) == ids
    assert (consumer.stats.applied, consumer.stats.retries, consumer.stats.dead_lettered) == (3, 0, 0)


# -- messages publish could never have written -------------------------------------


def test_messages_publish_never_writes_are_dead_lettered_at_once(
    effects: Engine, bootstrap_servers: str, topic: str, group: str, admin: KafkaAdminClient
) -> None:
    # Sent with a raw producer: NaN and Infinity in the JSON, no key, an empty
    # key, JSON in UTF-16. kafka-python's json.loads took all of them before.
    cases: list[tuple[bytes | None, bytes]] = [
        (b"acct-1", b'{"amount": NaN}'),
        (b"acct-1", b'{"amount": -Infinity}'),
        (None, b'{"amount": 1}'),
        (b"", b'{"amount": 1}'),
        (b"acct-1", json.dumps({"amount": 1}).encode("utf-16")),
    ]
    bad = []
    for key, value in cases:
        event_id, (_, _, headers) = cloud_event()
        bad.append((event_id, (key, value, headers)))
    good, good_message = cloud_event()
    produce(bootstrap_servers, topic, [(0, message) for _, message in bad] + [(0, good_message)])
    calls: list[uuid.UUID] = []

    def handler(session: Session, event: Event) -> None:
        calls.append(event.id)
        record_effect(session, event)

    with consumer_for(effects, bootstrap_servers, group, topic, handler) as consumer:
        drain(consumer, lambda: handled(consumer) == 6)

    assert calls == [good] and effect_rows(effects, topic) == [good]
    assert (consumer.stats.dead_lettered, consumer.stats.retries) == (5, 0)
    assert committed(admin, group) == {0: 6}
    with effects.connect() as conn:
        letters = list_dead_letters(conn, group)
    assert [letter.event_id for letter in letters] == _ids(bad)
    assert all(letter.attempts == 1 for letter in letters)
    assert all(letter.error.startswith("outbox.errors.MalformedMessageError: ")
               for letter in letters)
    errors = [letter.error for letter in letters]
    assert "NaN is not a JSON number" in errors[0]
    assert "-Infinity is not a JSON number" in errors[1]
    assert "message has no key" in errors[2]
    assert "message key is empty" in errors[3]
    assert "not valid application/json" in errors[4]
    assert letters[2].key is None and letters[3].key == b""
    assert letters[0].value == b'{"amount": NaN}'


def test_dead_letter_line_says_already_parked_only_for_a_redelivery(
    effects: Engine, bootstrap_servers: str, topic: str, group: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="outbox.consumer")
    produce(bootstrap_servers, topic, [(0, (b"k", b"{}", []))])  # no CloudEvents headers
    with consumer_for(effects, bootstrap_servers, group, topic, record_effect) as consumer:
        drain(consumer, lambda: consumer.stats.dead_lettered == 1)
        [first] = [r.getMessage() for r in caplog.records if "dead-lettered" in r.getMessage()]
        assert "already parked" not in first
        caplog.clear()
        consumer._offsets.client.seek(TopicPartition(topic, 0), 0)  # the same message read again
        drain(consumer, lambda: consumer.stats.dead_lettered == 2)
    [again] = [r.getMessage() for r in caplog.records if "dead-lettered" in r.getMessage()]
    assert again.endswith("(already parked before)")
    with effects.connect() as conn:
        assert len(list_dead_letters(conn, group)) == 1


# -- a database that is wrong, not down -----------------------------------------------


def _url_with(database_url: str, **parts: Any) -> str:
    return make_url(database_url).set(**parts).render_as_string(hide_password=False)


def test_wrong_database_password_at_start_is_one_config_error_and_touches_nothing(
    database_url: str, bootstrap_servers: str, topic: str, group: str, admin: KafkaAdminClient,
    effects: Engine,
) -> None:
    produce(bootstrap_servers, topic, [(0, cloud_event()[1])])
    engine = create_engine(_url_with(database_url, password="not-the-password-5e3"))
    consumer = consumer_for(engine, bootstrap_servers, group, topic, record_effect)
    try:
        with pytest.raises(ConfigError) as raised:
            consumer.run_once(200)
    finally:
        consumer.close()
        engine.dispose()
    message = str(raised.value)
    assert "\n" not in message and "not-the-password-5e3" not in message
    assert "password authentication failed" in message and "OUTBOX_DATABASE_URL" in message
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    assert consumer._offsets.client is None  # never joined the group, never read a message
    assert committed(admin, group) == {}
    with effects.connect() as conn:
        assert list_dead_letters(conn, group) == []


@pytest.fixture
def scratch_schema(engine: Engine, database_url: str) -> Iterator[tuple[str, str]]:
    """A PostgreSQL schema of its own, and a URL whose search_path is only that schema."""
    name = f"scratch_{uuid.uuid4().hex[:10]}"
    with engine.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {name}"))
    url = make_url(database_url)
    scoped = url.set(query={**url.query, "options": f"-csearch_path={name}"})
    try:
        yield name, scoped.render_as_string(hide_password=False)
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {name} CASCADE"))


@pytest.mark.parametrize(
    ("revision", "expected"),
    [(None, "has none of the kit's tables"), ("0001_outbox", "older than this kit")],
    ids=["no tables", "older schema"],
)
def test_consumer_against_missing_or_older_tables_fails_in_one_line_before_reading(
    revision: str | None, expected: str, scratch_schema: tuple[str, str],
    bootstrap_servers: str, topic: str, group: str, admin: KafkaAdminClient,
) -> None:
    _, url = scratch_schema
    if revision is not None:
        migrate.upgrade(url, revision)
    produce(bootstrap_servers, topic, [(0, cloud_event(data={"pan": "4111-secret"})[1])])
    engine = create_engine(url)
    consumer = consumer_for(engine, bootstrap_servers, group, topic, record_effect)
    try:
        with pytest.raises(SchemaError) as raised:
            consumer.run_once(200)
    finally:
        consumer.close()
        engine.dispose()
    message = str(raised.value)
    assert expected in message and "run `outbox db upgrade`" in message
    assert "\n" not in message and "4111" not in message
    assert raised.value.__cause__ is None
    assert consumer._offsets.client is None and committed(admin, group) == {}


def test_role_without_a_grant_is_a_config_error_at_start(
    scratch_schema: tuple[str, str], bootstrap_servers: str, topic: str, group: str,
) -> None:
    name, url = scratch_schema
    migrate.upgrade(url)
    engine = create_engine(url)
    with engine.begin() as conn:  # the owner may take a privilege from itself
        conn.execute(text(f"REVOKE INSERT ON {name}.outbox_dead_letter FROM CURRENT_USER"))
    consumer = consumer_for(engine, bootstrap_servers, group, topic, record_effect)
    try:
        with pytest.raises(ConfigError) as raised:
            consumer.run_once(200)
    finally:
        consumer.close()
        engine.dispose()
    assert "lacks INSERT on outbox_dead_letter" in str(raised.value)


def test_kit_table_dropped_while_running_raises_schema_error_and_parks_nothing(
    scratch_schema: tuple[str, str], bootstrap_servers: str, topic: str, group: str,
    admin: KafkaAdminClient,
) -> None:
    name, url = scratch_schema
    migrate.upgrade(url)
    engine = create_engine(url)
    consumer = consumer_for(engine, bootstrap_servers, group, topic, record_effect)
    try:
        consumer.run_once(200)  # the start checks pass
        engine.dispose()
        with engine.begin() as conn:
            conn.execute(text(f"DROP TABLE {name}.outbox_inbox"))
        produce(bootstrap_servers, topic, [(0, cloud_event(data={"pan": "4111-secret"})[1])])
        deadline = time.monotonic() + 30
        with pytest.raises(SchemaError) as raised:
            while time.monotonic() < deadline:
                consumer.run_once(200)
    finally:
        consumer.close()
    message = str(raised.value)
    assert "a table is missing" in message and "run `outbox db upgrade`" in message
    assert "\n" not in message and "4111" not in message and raised.value.__cause__ is None
    with engine.connect() as conn:
        parked = conn.execute(text(f"SELECT count(*) FROM {name}.outbox_dead_letter")).scalar()
    engine.dispose()
    assert parked == 0 and consumer.stats.dead_lettered == 0
    assert committed(admin, group) == {}


def test_login_refused_mid_run_is_waited_out_with_one_clear_line(
    database_url: str, bootstrap_servers: str, topic: str, group: str, effects: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The password rotated under a running consumer: an outage that names its
    # cause once, never a dead letter, and the messages apply once it is fixed.
    caplog.set_level(logging.DEBUG, logger="outbox.consumer")
    password = ["wrong-rotated-pw-77"]
    engine = create_engine(database_url)
    real_password = make_url(database_url).password

    @event.listens_for(engine, "do_connect")
    def use_current_password(dialect: Any, record: Any, cargs: Any, cparams: Any) -> None:
        cparams["password"] = password[0] if password else real_password

    first, first_message = cloud_event()
    second, second_message = cloud_event()
    waits: list[float] = []

    def wait(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 4:
            password.clear()  # fixed

    consumer = Consumer(engine, group=group, topics=[topic], handler=record_effect,
                        bootstrap_servers=bootstrap_servers, config=FAST_CONFIG, sleep=wait,
                        **FAST_KAFKA)
    try:
        password.clear()
        produce(bootstrap_servers, topic, [(0, first_message)])
        drain(consumer, lambda: consumer.stats.applied == 1)
        password.append("wrong-rotated-pw-77")
        engine.dispose()
        produce(bootstrap_servers, topic, [(0, second_message)])
        drain(consumer, lambda: consumer.stats.applied == 2)
    finally:
        consumer.close()
        engine.dispose()

    assert effect_rows(effects, topic) == [first, second]
    assert consumer.stats.dead_lettered == 0 and consumer.stats.database_waits == 4
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and "database unavailable" in r.getMessage()]
    assert len(warnings) == 1
    assert "refuses the consumer's login" in warnings[0] and "OUTBOX_DATABASE_URL" in warnings[0]
    assert "password authentication failed" in warnings[0]
    assert all("wrong-rotated-pw-77" not in r.getMessage() for r in caplog.records)
    assert any("database available again" in r.getMessage() for r in caplog.records)


def test_database_down_at_start_is_waited_out_with_one_line_then_consumed(
    database_url: str, bootstrap_servers: str, topic: str, group: str, effects: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Down, not wrong: the start checks wait for it (a WARNING when the
    # outage starts, an INFO when it ends), and the consumer then goes on.
    caplog.set_level(logging.INFO, logger="outbox.consumer")
    url = make_url(database_url)
    proxy = FlakyProxy((url.host or "127.0.0.1", url.port or 5432))
    engine = create_engine(url.set(host="127.0.0.1", port=proxy.port))
    event_id, message = cloud_event()
    produce(bootstrap_servers, topic, [(0, message)])
    waits: list[float] = []

    def wait(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 5:
            proxy.up = True

    proxy.cut()
    consumer = Consumer(engine, group=group, topics=[topic], handler=record_effect,
                        bootstrap_servers=bootstrap_servers, config=FAST_CONFIG, sleep=wait,
                        **FAST_KAFKA)
    try:
        drain(consumer, lambda: consumer.stats.applied == 1)
    finally:
        consumer.close()
        engine.dispose()
        proxy.close()
    assert effect_rows(effects, topic) == [event_id] and consumer.stats.database_waits == 5
    lines = [r.getMessage() for r in caplog.records if "database" in r.getMessage()]
    assert len(lines) == 2, lines
    assert lines[0].startswith("database unavailable, waiting") and "before the first poll" in lines[0]
    assert "the database does not answer" in lines[0]
    assert lines[1].startswith("database available again after")


def test_broker_down_at_start_is_waited_out_with_one_line_then_consumed(
    clean_db: Engine, bootstrap_servers: str, topic: str, group: str, effects: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # kafka-python 3 raises connection errors out of KafkaConsumer() and poll();
    # they once ended run() (and with it the consumer's /readyz). Bootstrapping
    # through a proxy that refuses, then lets through, makes one happen at will.
    caplog.set_level(logging.INFO, logger="outbox.consumer")
    host, port = bootstrap_servers.split(",")[0].rsplit(":", 1)
    proxy = FlakyProxy((host, int(port)))
    proxy.cut()
    event_id, message = cloud_event()
    produce(bootstrap_servers, topic, [(0, message)])
    consumer = Consumer(clean_db, group=group, topics=[topic], handler=record_effect,
                        bootstrap_servers=f"127.0.0.1:{proxy.port}", config=FAST_CONFIG,
                        **FAST_KAFKA)
    thread = threading.Thread(target=consumer.run, name="consumer", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while consumer.observer.health.ready() is None or "transport" not in str(
                consumer.observer.health.ready()):
            assert thread.is_alive(), "the consumer loop ended on a broker outage"
            assert time.monotonic() < deadline, consumer.observer.health.ready()
            time.sleep(0.2)
        ready = str(consumer.observer.health.ready())
        assert ready.startswith("transport: waiting for the broker") and "\n" not in ready, ready
        time.sleep(6)  # more than one bootstrap attempt: still one WARNING
        assert thread.is_alive()
        proxy.up = True
        deadline = time.monotonic() + 90
        while consumer.stats.applied < 1:
            assert thread.is_alive(), "the consumer loop ended on a broker outage"
            assert time.monotonic() < deadline, "not consumed after the broker answered"
            time.sleep(0.2)
    finally:
        consumer.stop()
        thread.join(30)
        proxy.close()
    assert not thread.is_alive()
    assert effect_rows(effects, topic) == [event_id]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("kafka ")]
    assert len(lines) == 2, lines
    assert lines[0].startswith("kafka unavailable to the consumer, waiting for it")
    assert "Unable to bootstrap" in lines[0]
    assert lines[1].startswith("kafka available to the consumer again after")


# -- kafka-python's DEBUG logs ------------------------------------------------------------


SASL_SERVERS_ENV = "OUTBOX_TEST_KAFKA_SASL_SERVERS"
SASL_USER, SASL_PASSWORD = "outbox", "outbox-sasl-secret"  # devstack/devstack's SASL listener


@pytest.fixture
def sasl_servers() -> str:
    import os

    servers = os.environ.get(SASL_SERVERS_ENV, "127.0.0.1:19094")
    host, _, port = servers.split(",")[0].rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise AssertionError(
            f"no SASL_PLAINTEXT listener at {servers} ({exc}): the devstack's broker has one on "
            f"127.0.0.1:19094 (user {SASL_USER}); set {SASL_SERVERS_ENV} for another"
        ) from None
    return servers


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self._lock2 = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        line = self.format(record)
        with self._lock2:
            self.lines.append(line)


@contextlib.contextmanager
def root_debug_capture() -> Iterator[_Capture]:
    root = logging.getLogger()
    capture = _Capture()
    capture.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    old_level = root.level
    kafka_levels = {name: logging.getLogger(name).level for name in ("kafka", *KAFKA_WIRE_LOGGERS)}
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    for name in kafka_levels:
        logging.getLogger(name).setLevel(logging.NOTSET)
    try:
        yield capture
    finally:
        root.removeHandler(capture)
        root.setLevel(old_level)
        for name, level in kafka_levels.items():
            logging.getLogger(name).setLevel(level)


def _sasl_bootstrap(servers: str, password: str) -> None:
    """A kafka-python consumer that authenticates (or tries to) and fetches metadata."""
    try:
        client = KafkaConsumer(
            bootstrap_servers=servers, security_protocol="SASL_PLAINTEXT",
            sasl_mechanism="PLAIN", sasl_plain_username=SASL_USER, sasl_plain_password=password,
            request_timeout_ms=10000, bootstrap_timeout_ms=3000,
        )
    except KafkaError:
        if password == SASL_PASSWORD:
            raise
        return  # the wrong password: refused, as it should be
    try:
        client.topics()
    finally:
        client.close()


def _unprotected() -> None:
    for name in KAFKA_WIRE_LOGGERS:
        logging.getLogger(name).removeFilter(_FILTER)


def test_sasl_password_never_reaches_the_logs_at_debug(
    sasl_servers: str, effects: Engine, group: str,
) -> None:
    wrong = "wrong-sasl-pw-19"
    # Without the filter, kafka-python logs the password (this proves the test can see it) ...
    _unprotected()
    try:
        with root_debug_capture() as capture:
            _sasl_bootstrap(sasl_servers, SASL_PASSWORD)
            _sasl_bootstrap(sasl_servers, wrong)
        assert any(SASL_PASSWORD in line for line in capture.lines)
        assert any(wrong in line for line in capture.lines)
    finally:
        protect_kafka_logs()
    # ... and with it, built by the Consumer, neither the right one nor a wrong one appears.
    _unprotected()
    Consumer(effects, group=group, topics=["t"], handler=record_effect,
             bootstrap_servers=sasl_servers).close()
    with root_debug_capture() as capture:
        _sasl_bootstrap(sasl_servers, SASL_PASSWORD)
        _sasl_bootstrap(sasl_servers, wrong)
    text_ = "\n".join(capture.lines)
    assert "Authenticated as outbox via SASL / Plain" in text_  # the exchange did happen
    assert re.search(r"<SaslAuthenticateRequest\w*, contents not logged>", text_)
    assert SASL_PASSWORD not in text_ and wrong not in text_
    assert SASL_PASSWORD.encode().hex() not in text_
