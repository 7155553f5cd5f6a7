"""The consumer's guarantees, against the real PostgreSQL and the real Kafka broker.

Every test produces its own CloudEvents messages with kafka-python (headers
from `outbox.envelope.encode_headers`), on a fresh topic, read by a fresh
consumer group; the handlers write into `test_consumer_effect`, which has no
unique key, so a double application would show as two rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kafka import KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient
from sqlalchemy import Engine, create_engine, insert, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from harness.devstack import REPO
from outbox.consumer import Consumer
from outbox.consumer_config import ConsumerConfig
from outbox.dead_letters import list_dead_letters, replay_dead_letters
from outbox.envelope import encode_headers
from outbox.event import Event
from outbox.failpoints import FAILPOINT_ENV
from outbox.inbox import apply_event, purge_inbox
from outbox.schema import outbox_dead_letter, outbox_inbox
from tests.consumer_proc import record_effect

pytestmark = pytest.mark.integration

FAST_KAFKA: dict[str, Any] = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000}
FAST_CONFIG = ConsumerConfig(
    max_attempts=3, retry_backoff_base=0.01, retry_backoff_max=0.05,
    db_backoff_base=0.05, db_backoff_max=0.3, poll_timeout_ms=200,
)

Message = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]


# -- helpers -------------------------------------------------------------------


def cloud_event(
    event_id: uuid.UUID | None = None, *, key: str = "acct-1", data: Any = None,
    type: str = "payment.captured",
) -> tuple[uuid.UUID, Message]:
    event_id = event_id or uuid.uuid4()
    headers = encode_headers(
        event_id=event_id, type=type, source="/tests", time=datetime.now(UTC),
        content_type="application/json", headers={"trace": "t-1"},
    )
    value = json.dumps(data if data is not None else {"amount": 100}).encode()
    return event_id, (key.encode(), value, headers)


def produce(bootstrap_servers: str, topic: str, messages: list[tuple[int, Message]]) -> None:
    """Send (partition, message) pairs in order and wait for every acknowledgement."""
    producer = KafkaProducer(bootstrap_servers=bootstrap_servers, acks="all")
    try:
        for partition, (key, value, headers) in messages:
            producer.send(topic, key=key, value=value, headers=headers, partition=partition)
        producer.flush(timeout=30)
    finally:
        producer.close()


def consumer_for(
    engine: Engine, bootstrap_servers: str, group: str, topic: str,
    handler: Callable[[Session, Event], object], *, config: ConsumerConfig = FAST_CONFIG,
    sleeps: list[float] | None = None,
) -> Consumer:
    waits = sleeps if sleeps is not None else []
    return Consumer(
        engine, group=group, topics=[topic], handler=handler,
        bootstrap_servers=bootstrap_servers, config=config, sleep=waits.append, **FAST_KAFKA,
    )


def drain(consumer: Consumer, done: Callable[[], bool], timeout: float = 30.0) -> None:
    """run_once until `done()` holds and a poll came back empty."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        handled = consumer.run_once(200)
        if handled == 0 and done():
            return
    raise AssertionError(f"consumer did not finish in {timeout}s; stats={consumer.stats}")


def effect_rows(engine: Engine, topic: str) -> list[uuid.UUID]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                text(
                    "SELECT event_id FROM test_consumer_effect WHERE topic = :t"
                    " ORDER BY applied_at"
                ),
                {"t": topic},
            ).scalars()
        )


def committed(admin: KafkaAdminClient, group: str) -> dict[int, int]:
    offsets = admin.list_group_offsets(group).get(group, {})
    return {tp.partition: meta.offset for tp, meta in offsets.items() if meta.offset >= 0}


def handled(consumer: Consumer) -> int:
    s = consumer.stats
    return s.applied + s.duplicates + s.dead_lettered


# -- duplicates ----------------------------------------------------------------


def test_same_event_on_two_offsets_and_two_partitions_is_applied_once(
    effects: Engine, bootstrap_servers: str, topic: str, group: str, admin: KafkaAdminClient
) -> None:
    twice, message = cloud_event()
    other, other_message = cloud_event(key="acct-2")
    produce(
        bootstrap_servers, topic, [(0, message), (0, message), (1, message), (1, other_message)]
    )

    with consumer_for(effects, bootstrap_servers, group, topic, record_effect) as consumer:
        drain(consumer, lambda: handled(consumer) == 4)

    assert sorted(effect_rows(effects, topic)) == sorted([twice, other])
    assert (consumer.stats.applied, consumer.stats.duplicates) == (2, 2)
    assert committed(admin, group) == {0: 2, 1: 2}
    with effects.connect() as conn:
        inbox = conn.execute(
            select(outbox_inbox.c.event_id).where(outbox_inbox.c.consumer_group == group)
        ).scalars()
        assert sorted(inbox) == sorted([twice, other])


def test_two_transactions_racing_on_one_event_id_apply_it_once(effects: Engine, group: str) -> None:
    # Two members of one group holding the same event after a rebalance: the
    # inbox's unique key makes the second INSERT wait for the first
    # transaction, then return nothing, so the loser skips its handler.
    event = Event(id=uuid.uuid4(), topic=f"race-{uuid.uuid4().hex[:8]}", key="k", type="t",
                  data={}, time=datetime.now(UTC), partition=0, offset=0)
    first_inserted = threading.Event()
    results: dict[str, bool] = {}

    def slow_handler(session: Session, e: Event) -> None:
        record_effect(session, e)
        first_inserted.set()
        time.sleep(0.5)  # hold the uncommitted inbox row while the other one arrives

    def member(name: str, handler: Callable[[Session, Event], object]) -> None:
        with Session(effects) as session, session.begin():
            results[name] = apply_event(session, group=group, event=event, handler=handler)

    first = threading.Thread(target=member, args=("first", slow_handler))
    first.start()
    assert first_inserted.wait(10)
    started = time.monotonic()
    member("second", record_effect)
    first.join()

    assert results == {"first": True, "second": False}
    assert time.monotonic() - started > 0.2, "the second INSERT should have waited for the first"
    assert effect_rows(effects, event.topic) == [event.id]


# -- crash between database commit and offset commit ---------------------------


def run_consumer_process(
    group: str, topic: str, expect: int, database_url: str, bootstrap_servers: str,
    failpoint: str | None = None, transaction_batch_size: int | None = None,
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env.update(OUTBOX_DATABASE_URL=database_url, OUTBOX_KAFKA_BOOTSTRAP_SERVERS=bootstrap_servers)
    if failpoint:
        env[FAILPOINT_ENV] = failpoint
    batching = [] if transaction_batch_size is None else [
        "--transaction-batch-size", str(transaction_batch_size)
    ]
    return subprocess.run(
        [sys.executable, "-m", "tests.consumer_proc", "--group", group, "--topic", topic,
         "--expect", str(expect), *batching],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=90,
    )


def test_consumer_killed_between_db_commit_and_offset_commit_applies_each_event_once(
    effects: Engine, database_url: str, bootstrap_servers: str, topic: str, group: str
) -> None:
    events = [cloud_event(key=f"acct-{i % 2}") for i in range(6)]
    produce(bootstrap_servers, topic, [(0, message) for _, message in events])

    # A transaction per message, so that the third commit is the third message's.
    killed = run_consumer_process(group, topic, 6, database_url, bootstrap_servers,
                                  failpoint="consumer-after-db-commit:3", transaction_batch_size=1)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # The third transaction committed, its offset did not: three effects so far.
    assert len(effect_rows(effects, topic)) == 3

    restarted = run_consumer_process(group, topic, 6, database_url, bootstrap_servers,
                                     transaction_batch_size=1)
    assert restarted.returncode == 0, restarted.stderr
    stats = json.loads(restarted.stdout.strip().splitlines()[-1])

    rows = effect_rows(effects, topic)
    assert sorted(rows) == sorted(event_id for event_id, _ in events)  # one row per event
    assert stats["duplicates"] >= 1
    assert stats["applied"] == 3
    assert f"duplicate event {events[2][0]} skipped" in restarted.stderr


def test_consumer_killed_after_a_batch_commit_skips_the_whole_batch_on_restart(
    effects: Engine, database_url: str, bootstrap_servers: str, topic: str, group: str
) -> None:
    events = [cloud_event(key=f"acct-{i % 2}") for i in range(6)]
    produce(bootstrap_servers, topic, [(0, message) for _, message in events])

    killed = run_consumer_process(group, topic, 6, database_url, bootstrap_servers,
                                  failpoint="consumer-after-db-commit:1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # The first transaction committed several messages at once, no offset did.
    first_batch = effect_rows(effects, topic)
    assert len(first_batch) > 1
    assert first_batch == [event_id for event_id, _ in events[: len(first_batch)]]

    # Two more after the crash, so the restarted consumer has to read past the batch.
    later = [cloud_event() for _ in range(2)]
    produce(bootstrap_servers, topic, [(0, message) for _, message in later])
    restarted = run_consumer_process(group, topic, 8, database_url, bootstrap_servers)
    assert restarted.returncode == 0, restarted.stderr
    stats = json.loads(restarted.stdout.strip().splitlines()[-1])

    assert sorted(effect_rows(effects, topic)) == sorted(e for e, _ in events + later)
    assert (stats["duplicates"], stats["applied"]) == (len(first_batch), 8 - len(first_batch))
    for event_id in first_batch:
        assert f"duplicate event {event_id} skipped" in restarted.stderr


# -- batches: one transaction per poll, a savepoint per message -----------------


def transaction_ids(engine: Engine, topic: str) -> dict[uuid.UUID, int]:
    """The top-level transaction that wrote each effect row (see `record_effect_and_xid`)."""
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT event_id, (data->>'xid')::bigint FROM test_consumer_effect"
                 " WHERE topic = :t"),
            {"t": topic},
        ).all()
    return {event_id: xid for event_id, xid in rows}


def record_effect_and_xid(session: Session, event: Event) -> None:
    """`record_effect`, with the id of the top-level transaction it runs in as `data`."""
    xid = session.execute(text("SELECT txid_current()")).scalar_one()
    record_effect(session, dataclasses.replace(event, data={"xid": xid}))


def test_handler_failing_once_mid_batch_applies_every_message_once_in_order(
    effects: Engine, bootstrap_servers: str, topic: str, group: str, admin: KafkaAdminClient
) -> None:
    events = [cloud_event() for _ in range(5)]
    ids = [event_id for event_id, _ in events]
    produce(bootstrap_servers, topic, [(0, message) for _, message in events])
    calls: list[uuid.UUID] = []

    def flaky_middle(session: Session, event: Event) -> None:
        calls.append(event.id)
        record_effect_and_xid(session, event)  # rolled back with the batch when we raise
        if event.id == ids[2] and calls.count(event.id) == 1:
            raise RuntimeError("ledger busy")

    sleeps: list[float] = []
    with consumer_for(effects, bootstrap_servers, group, topic, flaky_middle,
                      sleeps=sleeps) as consumer:
        drain(consumer, lambda: handled(consumer) == 5)

    # The failure rolls back the batch; its first two run again without it.
    assert calls == [ids[0], ids[1], ids[2], ids[0], ids[1], ids[2], ids[3], ids[4]]
    assert effect_rows(effects, topic) == ids
    stats = consumer.stats
    assert (stats.applied, stats.duplicates, stats.retries, stats.dead_lettered) == (5, 0, 1, 0)
    assert len(sleeps) == 1
    assert committed(admin, group) == {0: 5}
    with effects.connect() as conn:
        assert list_dead_letters(conn, group) == []
    # Before the failure one transaction, the failing message alone, then batching again.
    xids = transaction_ids(effects, topic)
    assert xids[ids[0]] == xids[ids[1]]
    assert xids[ids[3]] == xids[ids[4]]
    assert len({xids[ids[1]], xids[ids[2]], xids[ids[3]]}) == 3


def test_handler_always_failing_mid_batch_parks_it_and_applies_its_neighbours_once(
    effects: Engine, bootstrap_servers: str, topic: str, group: str, admin: KafkaAdminClient
) -> None:
    events = [cloud_event(data={"amount": -1 if i == 2 else 100}) for i in range(5)]
    ids = [event_id for event_id, _ in events]
    produce(bootstrap_servers, topic, [(0, message) for _, message in events])
    calls: list[uuid.UUID] = []

    def strict(session: Session, event: Event) -> None:
        calls.append(event.id)
        record_effect(session, event)  # rolled back with the batch when we raise
        if event.data["amount"] < 0:
            raise ValueError("negative amount")

    with consumer_for(effects, bootstrap_servers, group, topic, strict) as consumer:
        drain(consumer, lambda: handled(consumer) == 5)

    assert effect_rows(effects, topic) == [ids[0], ids[1], ids[3], ids[4]]
    assert calls.count(ids[2]) == FAST_CONFIG.max_attempts
    assert [calls.count(i) for i in ids[:2] + ids[3:]] == [2, 2, 1, 1]
    stats = consumer.stats
    assert (stats.applied, stats.dead_lettered) == (4, 1)
    assert stats.retries == FAST_CONFIG.max_attempts - 1
    assert committed(admin, group) == {0: 5}
    with effects.connect() as conn:
        [letter] = list_dead_letters(conn, group)
        inbox = set(conn.execute(
            select(outbox_inbox.c.event_id).where(outbox_inbox.c.consumer_group == group)
        ).scalars())
    assert (letter.offset, letter.event_id, letter.attempts) == (2, ids[2], FAST_CONFIG.max_attempts)
    assert letter.error == "ValueError: negative amount"
    assert inbox == {ids[0], ids[1], ids[3], ids[4]}


def test_handler_swallowing_a_database_error_is_retried_not_counted_as_applied(
    effects: Engine, bootstrap_servers: str, topic: str, group: str, admin: KafkaAdminClient
) -> None:
    # PostgreSQL aborts the transaction after a failed statement even if the
    # handler catches the error: COMMIT would then quietly roll back the whole
    # batch. The consumer must see it, count it as that message's failure,
    # and keep its neighbours.
    events = [cloud_event() for _ in range(3)]
    ids = [event_id for event_id, _ in events]
    produce(bootstrap_servers, topic, [(0, message) for _, message in events])
    calls: list[uuid.UUID] = []

    def careless(session: Session, event: Event) -> None:
        calls.append(event.id)
        record_effect(session, event)
        if event.id == ids[1] and calls.count(event.id) == 1:
            with contextlib.suppress(Exception):
                session.execute(text("SELECT 1 / 0"))

    with consumer_for(effects, bootstrap_servers, group, topic, careless) as consumer:
        drain(consumer, lambda: handled(consumer) == 3)

    assert calls == [ids[0], ids[1], ids[0], ids[1], ids[2]]
    assert effect_rows(effects, topic) == ids
    stats = consumer.stats
    assert (stats.applied, stats.retries, stats.dead_lettered) == (3, 1, 0)
    assert committed(admin, group) == {0: 3}


def test_handler_rolling_back_the_session_loses_nothing_of_its_batch(
    effects: Engine, bootstrap_servers: str, topic: str, group: str, admin: KafkaAdminClient
) -> None:
    # Against the handler contract: the rollback is refused (it would take the
    # batch's earlier messages with it, and the session would quietly begin a
    # new transaction), the attempt fails, the earlier messages are applied
    # again and this one is retried. tests/integration/test_consumer_misuse.py tries every
    # other way of ending the transaction.
    events = [cloud_event() for _ in range(3)]
    ids = [event_id for event_id, _ in events]
    produce(bootstrap_servers, topic, [(0, message) for _, message in events])
    calls: list[uuid.UUID] = []

    def rude(session: Session, event: Event) -> None:
        calls.append(event.id)
        record_effect(session, event)
        if event.id == ids[1] and calls.count(event.id) == 1:
            session.rollback()

    with consumer_for(effects, bootstrap_servers, group, topic, rude) as consumer:
        drain(consumer, lambda: handled(consumer) == 3)

    assert calls == [ids[0], ids[1], ids[0], ids[1], ids[2]]
    assert effect_rows(effects, topic) == ids
    stats = consumer.stats
    assert (stats.applied, stats.duplicates, stats.retries, stats.dead_lettered) == (3, 0, 1, 0)
    assert committed(admin, group) == {0: 3}


def test_transaction_batch_size_one_applies_each_message_in_a_transaction_of_its_own(
    effects: Engine, bootstrap_servers: str, topic: str, group: str, admin: KafkaAdminClient
) -> None:
    twice, twice_message = cloud_event()
    events = [cloud_event() for _ in range(3)]
    ids = [event_id for event_id, _ in events]
    produce(bootstrap_servers, topic,
            [(0, message) for _, message in events] + [(0, twice_message), (0, twice_message)])
    calls: list[uuid.UUID] = []

    def flaky_middle(session: Session, event: Event) -> None:
        calls.append(event.id)
        record_effect_and_xid(session, event)
        if event.id == ids[1] and calls.count(event.id) == 1:
            raise RuntimeError("ledger busy")

    one_each = ConsumerConfig(
        max_attempts=3, retry_backoff_base=0.01, retry_backoff_max=0.05, poll_timeout_ms=200,
        transaction_batch_size=1,
    )
    with consumer_for(effects, bootstrap_servers, group, topic, flaky_middle,
                      config=one_each) as consumer:
        drain(consumer, lambda: handled(consumer) == 5)

    assert effect_rows(effects, topic) == [*ids, twice]
    stats = consumer.stats
    assert (stats.applied, stats.duplicates, stats.retries, stats.dead_lettered) == (4, 1, 1, 0)
    assert len(set(transaction_ids(effects, topic).values())) == 4
    assert committed(admin, group) == {0: 5}


# -- handler failures and dead letters -----------------------------------------


def test_handler_failing_then_succeeding_applies_once_without_dead_letter(
    effects: Engine, bootstrap_servers: str, topic: str, group: str
) -> None:
    event_id, message = cloud_event()
    produce(bootstrap_servers, topic, [(0, message)])
    calls: list[uuid.UUID] = []

    def flaky(session: Session, event: Event) -> None:
        record_effect(session, event)  # rolled back with the inbox row when we raise
        calls.append(event.id)
        if len(calls) < 3:
            raise RuntimeError("ledger busy")

    sleeps: list[float] = []
    with consumer_for(effects, bootstrap_servers, group, topic, flaky, sleeps=sleeps) as consumer:
        drain(consumer, lambda: handled(consumer) == 1)

    assert calls == [event_id] * 3
    assert effect_rows(effects, topic) == [event_id]
    stats = consumer.stats
    assert (stats.applied, stats.retries, stats.dead_lettered) == (1, 2, 0)
    assert len(sleeps) == 2 and all(0 <= s <= FAST_CONFIG.retry_backoff_max for s in sleeps)
    with effects.connect() as conn:
        assert list_dead_letters(conn, group) == []


def test_handler_always_failing_parks_dead_letter_then_replay_applies_it_once(
    effects: Engine, bootstrap_servers: str, topic: str, group: str, admin: KafkaAdminClient
) -> None:
    poison, poison_message = cloud_event(data={"amount": -1})
    later = [cloud_event() for _ in range(2)]
    produce(bootstrap_servers, topic, [(0, poison_message)] + [(0, m) for _, m in later])

    def strict(session: Session, event: Event) -> None:
        if event.data["amount"] < 0:
            raise ValueError("negative amount (connecting as postgresql://u:hunter2@db/x)")
        record_effect(session, event)

    with consumer_for(effects, bootstrap_servers, group, topic, strict) as consumer:
        drain(consumer, lambda: handled(consumer) == 3)

    # The partition moved on: the later events are applied, all offsets committed.
    assert effect_rows(effects, topic) == [event_id for event_id, _ in later]
    assert consumer.stats.dead_lettered == 1
    assert consumer.stats.retries == FAST_CONFIG.max_attempts - 1
    assert committed(admin, group) == {0: 3}

    with effects.connect() as conn:
        [letter] = list_dead_letters(conn, group)
    key, value, _ = poison_message
    assert (letter.topic, letter.partition, letter.offset) == (topic, 0, 0)
    assert letter.event_id == poison
    assert (letter.key, letter.value) == (key, value)
    assert letter.headers["ce_id"] == str(poison) and letter.headers["trace"] == "t-1"
    assert letter.attempts == FAST_CONFIG.max_attempts
    assert letter.error.startswith("ValueError: negative amount")
    assert "hunter2" not in letter.error

    def fixed(session: Session, event: Event) -> None:
        record_effect(session, event)

    first = replay_dead_letters(effects, group=group, handler=fixed)
    again = replay_dead_letters(effects, group=group, handler=fixed)
    by_id = replay_dead_letters(effects, group=group, handler=fixed, ids=[letter.id])

    assert first.applied == [letter.id] and not first.failed
    assert (again.applied, again.skipped) == ([], [])
    assert by_id.skipped == [letter.id]
    assert sorted(effect_rows(effects, topic)) == sorted([poison] + [e for e, _ in later])
    with effects.connect() as conn:
        assert list_dead_letters(conn, group) == []
        [replayed] = list_dead_letters(conn, group, include_replayed=True)
        assert replayed.replayed_at is not None


def test_replay_that_still_fails_stays_parked_with_the_new_error(
    effects: Engine, group: str
) -> None:
    event_id, (key, value, headers) = cloud_event()
    with effects.begin() as conn:
        dead_letter_id = conn.execute(
            insert(outbox_dead_letter).values(
                consumer_group=group, topic="t", partition=0, offset=7, event_id=event_id,
                key=key, value=value, headers={k: v.decode() for k, v in headers},
                error="RuntimeError: first", attempts=3,
            ).returning(outbox_dead_letter.c.id)
        ).scalar_one()

    def still_broken(session: Session, event: Event) -> None:
        record_effect(session, event)
        raise RuntimeError("second")

    result = replay_dead_letters(effects, group=group, handler=still_broken)

    assert result.failed == {dead_letter_id: "RuntimeError: second"}
    assert effect_rows(effects, "t").count(event_id) == 0
    with effects.connect() as conn:
        [letter] = list_dead_letters(conn, group)
    assert (letter.error, letter.attempts, letter.replayed_at) == ("RuntimeError: second", 4, None)


def test_malformed_messages_are_dead_lettered_at_once_and_consumer_keeps_going(
    effects: Engine, bootstrap_servers: str, topic: str, group: str, admin: KafkaAdminClient
) -> None:
    bad_json_id, (key, _, headers) = cloud_event()
    # a NUL byte, which a JSONB column refuses: stored hex-encoded instead
    bad_ce_id_headers = [(n, b"not-a-uuid\x00" if n == "ce_id" else v) for n, v in headers]
    good, good_message = cloud_event()
    produce(bootstrap_servers, topic, [
        (0, (b"k", b'{"amount": 1}', [])),  # no CloudEvents headers at all
        (0, (key, b"{not json", headers)),
        (0, (key, b"{}", bad_ce_id_headers)),
        (0, good_message),
    ])
    calls: list[uuid.UUID] = []

    def handler(session: Session, event: Event) -> None:
        calls.append(event.id)
        record_effect(session, event)

    with consumer_for(effects, bootstrap_servers, group, topic, handler) as consumer:
        drain(consumer, lambda: handled(consumer) == 4)

    assert calls == [good] and effect_rows(effects, topic) == [good]
    assert (consumer.stats.dead_lettered, consumer.stats.retries) == (3, 0)
    assert committed(admin, group) == {0: 4}
    with effects.connect() as conn:
        letters = list_dead_letters(conn, group)
    assert [letter.offset for letter in letters] == [0, 1, 2]
    assert [letter.event_id for letter in letters] == [None, bad_json_id, None]
    assert all(letter.attempts == 1 for letter in letters)
    assert all(letter.error.startswith("outbox.errors.MalformedMessageError") for letter in letters)
    assert letters[1].value == b"{not json"
    assert letters[2].headers["ce_id"] == "hex:" + b"not-a-uuid\x00".hex()
    assert letters[2].headers["ce_type"] == "payment.captured"


# -- stopping ------------------------------------------------------------------


def test_stop_during_retries_gives_the_message_back_undead_and_uncommitted(
    effects: Engine, bootstrap_servers: str, topic: str, group: str, admin: KafkaAdminClient
) -> None:
    event_id, message = cloud_event()
    produce(bootstrap_servers, topic, [(0, message)])
    consumer: Consumer | None = None

    def failing(session: Session, event: Event) -> None:
        raise RuntimeError("down for maintenance")

    def sleep_then_stop(seconds: float) -> None:
        assert consumer is not None
        consumer.stop()  # e.g. SIGTERM while the handler is between attempts

    consumer = Consumer(
        effects, group=group, topics=[topic], handler=failing, bootstrap_servers=bootstrap_servers,
        config=FAST_CONFIG, sleep=sleep_then_stop, **FAST_KAFKA,
    )
    deadline = time.monotonic() + 30
    while consumer.stats.retries == 0 and time.monotonic() < deadline:
        assert consumer.run_once(200) == 0
    consumer.close()
    consumer.close()  # twice is fine

    assert consumer.stats.retries == 1 and consumer.stats.dead_lettered == 0
    assert committed(admin, group) == {}
    with consumer_for(effects, bootstrap_servers, group, topic, record_effect) as successor:
        drain(successor, lambda: successor.stats.applied == 1)
    assert effect_rows(effects, topic) == [event_id]


def test_stop_mid_batch_commits_the_handled_part_and_unclaims_the_rest(
    effects: Engine, bootstrap_servers: str, topic: str, group: str, admin: KafkaAdminClient
) -> None:
    # The batch claims all its event ids in the inbox before the first handler
    # runs; a batch cut short must not commit the claims of the messages it
    # gives back, or their successor would skip them as duplicates.
    events = [cloud_event() for _ in range(5)]
    ids = [event_id for event_id, _ in events]
    produce(bootstrap_servers, topic, [(0, message) for _, message in events])
    consumer: Consumer | None = None

    def stop_after_second(session: Session, event: Event) -> None:
        assert consumer is not None
        record_effect(session, event)
        if event.id == ids[1]:
            consumer.stop()

    consumer = consumer_for(effects, bootstrap_servers, group, topic, stop_after_second)
    with consumer:
        deadline = time.monotonic() + 30
        while consumer.stats.applied == 0 and time.monotonic() < deadline:
            consumer.run_once(200)

    assert consumer.stats.applied == 2
    assert committed(admin, group) == {0: 2}
    with effects.connect() as conn:
        inbox = set(conn.execute(
            select(outbox_inbox.c.event_id).where(outbox_inbox.c.consumer_group == group)
        ).scalars())
    assert inbox == set(ids[:2])
    with consumer_for(effects, bootstrap_servers, group, topic, record_effect) as successor:
        drain(successor, lambda: successor.stats.applied == 3)
    assert effect_rows(effects, topic) == ids


def test_sigterm_stops_run_in_main_thread_and_restores_previous_handler(
    effects: Engine, bootstrap_servers: str, topic: str, group: str, admin: KafkaAdminClient
) -> None:
    assert threading.current_thread() is threading.main_thread()
    event_id, message = cloud_event()
    produce(bootstrap_servers, topic, [(0, message)])
    previous_called: list[int] = []
    consumer = consumer_for(effects, bootstrap_servers, group, topic, record_effect)

    def previous(signum: int, frame: object) -> None:
        previous_called.append(signum)
        consumer.stop()  # so a wrong handler fails the test instead of hanging it

    def send_sigterm_once_applied() -> None:
        deadline = time.monotonic() + 30
        while consumer.stats.applied == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    original = signal.signal(signal.SIGTERM, previous)
    try:
        killer = threading.Thread(target=send_sigterm_once_applied)
        killer.start()
        consumer.run()
        killer.join()
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, original)

    assert previous_called == []
    assert effect_rows(effects, topic) == [event_id]
    assert committed(admin, group) == {0: 1}


def test_stop_before_run_returns_at_once(effects: Engine, bootstrap_servers: str) -> None:
    consumer = consumer_for(effects, bootstrap_servers, "never-joins", "never-read", record_effect)
    consumer.stop()
    consumer.stop()
    before = signal.getsignal(signal.SIGTERM)
    started = time.monotonic()
    consumer.run()
    assert time.monotonic() - started < 1.0
    assert signal.getsignal(signal.SIGTERM) is before


# -- database outage -----------------------------------------------------------


class FlakyProxy:
    """A TCP proxy in front of the real PostgreSQL that can cut every connection."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.up = True
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            server = socket.create_connection(self.target)
            with self._lock:
                self._sockets.update((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            # shutdown, not just close: the opposite pipe is blocked in recv on one
            # of these sockets, and only shutdown wakes it and tells the client.
            for s in (src, dst):
                with self._lock:
                    self._sockets.discard(s)
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def cut(self) -> None:
        self.up = False
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._listener.close()


@pytest.fixture
def flaky_engine(database_url: str) -> Iterator[tuple[Engine, FlakyProxy]]:
    url = make_url(database_url)
    proxy = FlakyProxy((url.host or "127.0.0.1", url.port or 5432))
    engine = create_engine(url.set(host="127.0.0.1", port=proxy.port))
    yield engine, proxy
    engine.dispose()
    proxy.close()


def test_database_outage_retries_the_same_message_and_never_dead_letters_it(
    effects: Engine, flaky_engine: tuple[Engine, FlakyProxy], bootstrap_servers: str,
    topic: str, group: str, admin: KafkaAdminClient,
) -> None:
    engine, proxy = flaky_engine
    event_id, message = cloud_event()
    produce(bootstrap_servers, topic, [(0, message)])
    handler_calls: list[uuid.UUID] = []

    def handler(session: Session, event: Event) -> None:
        handler_calls.append(event.id)
        record_effect(session, event)

    # Real waits here (short ones): the consumer must not spin while the database is away.
    consumer = Consumer(
        engine, group=group, topics=[topic], handler=handler, bootstrap_servers=bootstrap_servers,
        config=FAST_CONFIG, **FAST_KAFKA,
    )
    proxy.cut()
    runner = threading.Thread(target=consumer.run)
    runner.start()
    try:
        deadline = time.monotonic() + 30
        while consumer.stats.database_waits < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert consumer.stats.database_waits >= 5
        assert committed(admin, group) == {}
        proxy.up = True
        while consumer.stats.applied == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        consumer.stop()
        runner.join(30)

    assert not runner.is_alive()
    assert consumer.stats.applied == 1
    assert (consumer.stats.dead_lettered, consumer.stats.retries) == (0, 0)
    assert handler_calls == [event_id]
    assert effect_rows(effects, topic) == [event_id]
    assert committed(admin, group) == {0: 1}
    with effects.connect() as conn:
        assert list_dead_letters(conn, group) == []


def test_database_outage_mid_batch_retries_the_whole_uncommitted_batch_and_parks_nothing(
    effects: Engine, flaky_engine: tuple[Engine, FlakyProxy], bootstrap_servers: str,
    topic: str, group: str, admin: KafkaAdminClient,
) -> None:
    engine, proxy = flaky_engine
    events = [cloud_event() for _ in range(4)]
    ids = [event_id for event_id, _ in events]
    produce(bootstrap_servers, topic, [(0, message) for _, message in events])
    calls: list[uuid.UUID] = []
    proxy_cut: list[bool] = []
    waits: list[float] = []

    def handler(session: Session, event: Event) -> None:
        calls.append(event.id)
        if event.id == ids[2] and not proxy_cut:
            proxy_cut.append(True)
            proxy.cut()  # the database goes away in the middle of the batch's transaction
        record_effect(session, event)

    def wait_then_restore(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 3:
            proxy.up = True

    consumer = Consumer(
        engine, group=group, topics=[topic], handler=handler, bootstrap_servers=bootstrap_servers,
        config=FAST_CONFIG, sleep=wait_then_restore, **FAST_KAFKA,
    )
    with consumer:
        drain(consumer, lambda: consumer.stats.applied == 4)

    # Nothing of the first try committed: the whole batch was applied again, once.
    assert calls == [ids[0], ids[1], ids[2], *ids]
    assert effect_rows(effects, topic) == ids
    stats = consumer.stats
    assert (stats.applied, stats.duplicates, stats.retries, stats.dead_lettered) == (4, 0, 0, 0)
    assert stats.database_waits == 3
    assert committed(admin, group) == {0: 4}
    with effects.connect() as conn:
        assert list_dead_letters(conn, group) == []


# -- inbox retention -----------------------------------------------------------


def test_purge_inbox_deletes_only_rows_older_than_the_cutoff(effects: Engine, group: str) -> None:
    other_group = group + "-other"
    now = datetime.now(UTC)
    rows = [(group, now - timedelta(days=30 + i)) for i in range(5)]  # old
    rows += [(group, now - timedelta(days=1)), (group, now)]  # recent
    rows += [(other_group, now - timedelta(days=30))]  # old, other group
    with effects.begin() as conn:
        conn.execute(insert(outbox_inbox), [
            {"consumer_group": g, "event_id": uuid.uuid4(), "topic": "t", "partition": 0,
             "offset": i, "processed_at": at}
            for i, (g, at) in enumerate(rows)
        ])

    deleted = purge_inbox(effects, older_than=timedelta(days=7), group=group, batch_size=2)

    assert deleted == 5
    with effects.connect() as conn:
        left = conn.execute(
            select(outbox_inbox.c.consumer_group, outbox_inbox.c.processed_at)
            .where(outbox_inbox.c.consumer_group.in_([group, other_group]))
        ).all()
    assert sorted((g, at) for g, at in left) == sorted(rows[5:])

    # Inside the caller's transaction: a rollback keeps the rows.
    with effects.connect() as conn:
        trans = conn.begin()
        assert purge_inbox(conn, older_than=timedelta(days=7), group=other_group) == 1
        trans.rollback()
    with effects.connect() as conn:
        count = conn.execute(
            select(outbox_inbox.c.event_id).where(outbox_inbox.c.consumer_group == other_group)
        ).all()
    assert len(count) == 1


def test_committed_offsets_never_pass_an_uncommitted_transaction(
    effects: Engine, bootstrap_servers: str, topic: str, group: str, admin: KafkaAdminClient
) -> None:
    # The handler looks at the committed offsets while its own transaction is
    # open: the offset of the message being applied must not be committed yet.
    messages = [cloud_event() for _ in range(3)]
    produce(bootstrap_servers, topic, [(2, m) for _, m in messages])
    seen: list[tuple[int, dict[int, int]]] = []

    def watching(session: Session, event: Event) -> None:
        assert event.offset is not None
        seen.append((event.offset, committed(admin, group)))
        record_effect(session, event)

    with consumer_for(effects, bootstrap_servers, group, topic, watching,
                      config=ConsumerConfig(poll_batch_size=1, poll_timeout_ms=200)) as consumer:
        drain(consumer, lambda: consumer.stats.applied == 3)

    for offset, offsets in seen:
        assert offsets.get(2, 0) <= offset
    assert committed(admin, group) == {2: 3}
    assert TopicPartition(topic, 2) not in consumer._offsets.pending


# -- rebalance -----------------------------------------------------------------


def test_rebalance_between_two_members_loses_and_doubles_nothing(
    effects: Engine, bootstrap_servers: str, topic: str, group: str, admin: KafkaAdminClient
) -> None:
    events = [cloud_event(key=f"acct-{i}") for i in range(32)]
    produce(bootstrap_servers, topic, [(i % 4, m) for i, (_, m) in enumerate(events)])
    small_batches = ConsumerConfig(poll_batch_size=2, poll_timeout_ms=200)

    def slow(session: Session, event: Event) -> None:
        time.sleep(0.1)  # so the first member is still busy when the second one joins
        record_effect(session, event)

    first = consumer_for(effects, bootstrap_servers, group, topic, slow, config=small_batches)
    second = consumer_for(effects, bootstrap_servers, group, topic, record_effect,
                          config=small_batches)
    try:
        deadline = time.monotonic() + 30
        while first.stats.applied < 4 and time.monotonic() < deadline:
            first.run_once(200)
        # The second member joins mid-stream: the first one's partitions are
        # revoked inside its next poll, after everything it handled was committed.
        idle = 0
        while idle < 3 and time.monotonic() < deadline:
            busy = first.run_once(100) + second.run_once(100)
            total = first.stats.applied + second.stats.applied
            idle = idle + 1 if busy == 0 and total >= len(events) else 0
        assert second.stats.applied > 0, "the second member never got a partition"
    finally:
        first.close()
        second.close()

    rows = effect_rows(effects, topic)
    assert sorted(rows) == sorted(event_id for event_id, _ in events)
    assert first.stats.applied + second.stats.applied == len(events)
    assert committed(admin, group) == {0: 8, 1: 8, 2: 8, 3: 8}
