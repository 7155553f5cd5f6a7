"""The relay against the real PostgreSQL and the real Kafka broker."""

from __future__ import annotations

import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from kafka.admin import KafkaAdminClient, NewTopic
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session

import outbox
from outbox.envelope import encode_headers
from outbox.parked import list_parked, replay_parked
from outbox.schema import SHARDS, outbox_event, outbox_parked
from outbox.stats import outbox_stats
from relay import RelayConfig, store
from tests import services
from tests.kafka_helpers import (
    first_occurrences,
    read_topic,
    relay_thread,
    start_relay_process,
    stop_process,
    wait_until,
)

pytestmark = pytest.mark.integration


def _write(engine: Engine, topic: str, n: int, *, keys: int = 10, size: int = 100) -> list[uuid.UUID]:
    ids: list[uuid.UUID] = []
    with Session(engine) as session:
        for i in range(n):
            event = outbox.publish(
                session, topic=topic, key=f"key-{i % keys}", type="payment.captured",
                data={"n": i, "pad": "x" * size},
            )
            ids.append(event.id)
        session.commit()
    return ids


def _backlog(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(outbox_event)).scalar_one()


def _config(database_url: str, bootstrap_servers: str, **kw: object) -> RelayConfig:
    return RelayConfig(
        database_url=database_url, bootstrap_servers=bootstrap_servers, poll_interval=0.2,
        backoff_max=2.0, **kw,  # type: ignore[arg-type]
    )


def _assert_in_commit_order(written: list[uuid.UUID], received_by_key: dict[str, list[uuid.UUID]],
                            key_of: dict[uuid.UUID, str]) -> None:
    expected: dict[str, list[uuid.UUID]] = {}
    for event_id in written:
        expected.setdefault(key_of[event_id], []).append(event_id)
    assert received_by_key == expected


def test_relay_publishes_cloudevents_in_commit_order(
    clean_db: Engine, database_url: str, bootstrap_servers: str, topic: str
) -> None:
    ids = _write(clean_db, topic, 300, keys=7)
    with relay_thread(_config(database_url, bootstrap_servers, batch_size=64)):
        wait_until(lambda: _backlog(clean_db) == 0, timeout=60, what="backlog to drain")
    received = read_topic(bootstrap_servers, topic, expect=300)
    assert sorted(r.event_id for r in received) == sorted(ids)  # each exactly once
    first = received[0]
    assert first.headers["ce_specversion"] == b"1.0"
    assert first.headers["ce_source"] == b"outbox-relay"
    assert first.headers["ce_type"] == b"payment.captured"
    assert first.headers["content-type"] == b"application/json"
    assert first.headers["ce_time"].endswith(b"Z")
    key_of = {event_id: f"key-{i % 7}" for i, event_id in enumerate(ids)}
    _assert_in_commit_order(ids, first_occurrences(received), key_of)
    with clean_db.connect() as conn:
        stats = outbox_stats(conn)
    assert (stats.committed, stats.published, stats.backlog) == (300, 300, 0)


def test_a_relay_started_on_a_backlog_publishes_at_once_and_stops_without_waiting_a_poll(
    clean_db: Engine, database_url: str, bootstrap_servers: str, topic: str
) -> None:
    """Issue 11: the backlog's NOTIFYs were sent before the relay listened, so
    only its first round can find them; with a 60 s poll interval a relay whose
    first round came before its leases would sit for a minute. And stop()
    (SIGTERM in the daemon) must not wait out that interval either."""
    ids = _write(clean_db, topic, 200, keys=20)
    config = RelayConfig(database_url=database_url, bootstrap_servers=bootstrap_servers,
                         poll_interval=60.0, backoff_max=2.0)
    with relay_thread(config):  # asserts that the relay stops within 30 s
        wait_until(lambda: _backlog(clean_db) == 0, timeout=30,
                   what="the backlog to drain before the first 60 s poll")
    received = read_topic(bootstrap_servers, topic, expect=200)
    assert sorted(r.event_id for r in received) == sorted(ids)


def test_relay_headers_are_exactly_encode_headers_of_the_stored_event(
    clean_db: Engine, database_url: str, bootstrap_servers: str, topic: str
) -> None:
    """The relay formats ce_id and ce_time in SQL and pre-encodes the constant
    attributes; the bytes on the wire must be those of `encode_headers`, the
    reference, for any stored time (six digits of microseconds even at zero,
    UTC whatever the session's time zone) and with or without user headers."""
    with Session(clean_db) as session:
        plain = outbox.publish(session, topic=topic, key="a", type="payment.captured", data={})
        with_headers = outbox.publish(
            session, topic=topic, key="b", type="payment.refunded", data=b"raw",
            headers={"traceparent": "00-abc-def-01", "x-tenant": "zürich"},
        )
        session.commit()
    with clean_db.begin() as conn:
        conn.execute(text(
            "UPDATE outbox_event SET created_at = CASE id"
            " WHEN :plain THEN timestamptz '2026-03-01 12:00:00+00'"
            " ELSE timestamptz '2026-03-01 23:59:59.000001+05:30' END"
        ), {"plain": plain.id})
        stored = conn.execute(select(
            outbox_event.c.id, outbox_event.c.type, outbox_event.c.created_at,
            outbox_event.c.content_type, outbox_event.c.headers,
        )).all()
    # The relay's own session in a time zone that is neither UTC nor whole hours.
    url = f"{database_url}{'&' if '?' in database_url else '?'}options=-c%20TimeZone%3DAmerica/St_Johns"
    with relay_thread(_config(url, bootstrap_servers)):
        wait_until(lambda: _backlog(clean_db) == 0, timeout=30, what="backlog to drain")
    received = {r.event_id: r for r in read_topic(bootstrap_servers, topic, expect=2)}
    assert len(received) == 2
    for event_id, type, created_at, content_type, headers in stored:
        expected = encode_headers(
            event_id=event_id, type=type, source="outbox-relay", time=created_at,
            content_type=content_type, headers=headers,
        )
        assert list(received[event_id].headers.items()) == expected
    assert received[plain.id].headers["ce_time"] == b"2026-03-01T12:00:00.000000Z"
    assert received[with_headers.id].headers["ce_time"] == b"2026-03-01T18:29:59.000001Z"
    assert received[with_headers.id].headers["x-tenant"] == "zürich".encode()


@pytest.mark.parametrize("publisher", ["kafka-python", "confluent"])
def test_a_refused_event_holds_back_later_events_of_its_key_only(
    clean_db: Engine, database_url: str, bootstrap_servers: str, topic: str, publisher: str
) -> None:
    """Both publishers: the producer refuses an event at once (larger than its
    max request size); the later event of the same key waits behind it, not
    counted as a failure, while other keys go on."""
    with Session(clean_db) as session:
        first = outbox.publish(session, topic=topic, key="k", type="t", data={"n": 1})
        big = outbox.publish(
            session, topic=topic, key="k", type="t", data="x" * 1_500_000,
            max_payload_bytes=2_000_000,
        )
        later = outbox.publish(session, topic=topic, key="k", type="t", data={"n": 3})
        other = outbox.publish(session, topic=topic, key="other", type="t", data={"n": 4})
        session.commit()

    def attempts(event_id: uuid.UUID) -> int | None:
        with clean_db.connect() as conn:
            return conn.execute(
                select(outbox_event.c.attempts).where(outbox_event.c.id == event_id)
            ).scalar_one_or_none()

    config = _config(database_url, bootstrap_servers, max_attempts=1000, publisher=publisher)
    with relay_thread(config):
        wait_until(lambda: (attempts(big.id) or 0) >= 3, timeout=30, what="three refusals")
    assert _backlog(clean_db) == 2  # the refused event and the one behind it
    assert attempts(later.id) == 0
    received = read_topic(bootstrap_servers, topic, expect=2)
    assert {r.event_id for r in received} == {first.id, other.id}

    # Parked (as after max_attempts), it no longer holds its key back.
    with clean_db.begin() as conn:
        conn.execute(text(
            "WITH p AS (DELETE FROM outbox_event WHERE id = :id RETURNING *)"
            " INSERT INTO outbox_parked (id, topic, key, type, payload, content_type, headers,"
            " created_at, position, attempts, error)"
            " SELECT id, topic, key, type, payload, content_type, headers, created_at, position,"
            " attempts, 'test' FROM p"
        ), {"id": big.id})
    with relay_thread(config):
        wait_until(lambda: _backlog(clean_db) == 0, timeout=30, what="the held-back event")
    received = read_topic(bootstrap_servers, topic, expect=3)
    assert first_occurrences(received)["k"] == [first.id, later.id]
    with clean_db.connect() as conn:
        assert conn.execute(select(func.count()).select_from(outbox_parked)).scalar_one() == 1


def test_concurrent_same_key_transactions_are_published_in_commit_order(
    clean_db: Engine, database_url: str, bootstrap_servers: str, topic: str
) -> None:
    """T1 begins and writes first; T2 writes and commits first; Kafka shows T2, then T1."""
    t1, t2 = Session(clean_db), Session(clean_db)
    try:
        first = outbox.publish(t1, topic=topic, key="pay-1", type="payment.authorised", data={})
        t1.flush()
        second = outbox.publish(t2, topic=topic, key="pay-1", type="payment.captured", data={})
        t2.flush()
        t2.commit()
        t1.commit()
    finally:
        t1.close()
        t2.close()
    with relay_thread(_config(database_url, bootstrap_servers)):
        wait_until(lambda: _backlog(clean_db) == 0, timeout=30, what="backlog to drain")
    received = read_topic(bootstrap_servers, topic, expect=2)
    assert first_occurrences(received) == {"pay-1": [second.id, first.id]}


@pytest.mark.parametrize("window", [1, 4])
def test_relay_killed_after_ack_republishes_same_ids(
    clean_db: Engine, database_url: str, bootstrap_servers: str, topic: str, tmp_path: Path,
    window: int,
) -> None:
    """A crash republishes at most the window in flight (`window` batches), with the same ids."""
    ids = _write(clean_db, topic, 1000, keys=13)
    # SIGKILL itself after the broker acknowledged its 3rd batch, before deleting it.
    proc = start_relay_process(
        database_url, bootstrap_servers, log_path=tmp_path / "relay.log",
        extra_env={"OUTBOX_FAILPOINT": "relay-after-ack:3", "OUTBOX_RELAY_BATCH_SIZE": "100",
                   "OUTBOX_RELAY_MAX_IN_FLIGHT": str(window)},
    )
    assert proc.wait(timeout=60) == -signal.SIGKILL
    # Two batches acknowledged and deleted before; the third acked but not
    # deleted. With a window, deletes run beside the sending: the first two
    # may still have been queued at the kill (they count in the window).
    backlog = _backlog(clean_db)
    assert backlog == 800 if window == 1 else 800 <= backlog <= 1000

    proc = start_relay_process(database_url, bootstrap_servers, log_path=tmp_path / "relay.log")
    try:
        wait_until(lambda: _backlog(clean_db) == 0, timeout=60, what="backlog to drain")
    finally:
        assert stop_process(proc) == 0
    received = read_topic(bootstrap_servers, topic, expect=1000)
    assert {r.event_id for r in received} == set(ids)  # nothing lost
    duplicates = len(received) - len(ids)
    # The batch acknowledged but not deleted, and at most the window sent after it.
    assert 100 <= duplicates <= window * 100
    if window == 1:
        assert duplicates == 100
    key_of = {event_id: f"key-{i % 13}" for i, event_id in enumerate(ids)}
    _assert_in_commit_order(ids, first_occurrences(received), key_of)


def test_broker_restarted_under_load_loses_nothing(
    clean_db: Engine, database_url: str, bootstrap_servers: str, topic: str, tmp_path: Path
) -> None:
    services.require_devstack()
    written: list[uuid.UUID] = []
    stop_writing = threading.Event()

    def writer() -> None:
        while not stop_writing.is_set():
            written.extend(_write(clean_db, topic, 20, keys=5, size=50))
            time.sleep(0.02)

    proc = start_relay_process(database_url, bootstrap_servers, log_path=tmp_path / "relay.log")
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(2)
        services.restart_kafka()  # SIGKILL the broker, start it again, wait until it answers
        time.sleep(2)
        stop_writing.set()
        thread.join()
        wait_until(lambda: _backlog(clean_db) == 0, timeout=120, what="backlog to drain")
        assert proc.poll() is None, "the relay must ride out the outage, not exit"
    finally:
        stop_writing.set()
        thread.join()
        stop_process(proc)
    received = read_topic(bootstrap_servers, topic, expect=len(written), timeout=90)
    assert {r.event_id for r in received} == set(written)
    key_of = {r.event_id: r.key for r in received}
    _assert_in_commit_order(written, first_occurrences(received), key_of)


def test_relay_survives_a_database_restart(
    clean_db: Engine, database_url: str, bootstrap_servers: str, topic: str, tmp_path: Path
) -> None:
    services.require_devstack()
    before = _write(clean_db, topic, 100)
    proc = start_relay_process(database_url, bootstrap_servers, log_path=tmp_path / "relay.log")
    try:
        wait_until(lambda: _backlog(clean_db) == 0, timeout=60, what="first backlog to drain")
        services.restart_postgres()  # immediate-mode stop (a crash) and start
        clean_db.dispose()
        after = _write(clean_db, topic, 100)
        wait_until(lambda: _backlog(clean_db) == 0, timeout=60, what="second backlog to drain")
        assert proc.poll() is None
    finally:
        stop_process(proc)
    received = read_topic(bootstrap_servers, topic, expect=200)
    assert {r.event_id for r in received} == set(before + after)


def test_sigterm_finishes_the_round_and_exits_zero(
    clean_db: Engine, database_url: str, bootstrap_servers: str, topic: str
) -> None:
    ids = _write(clean_db, topic, 2000, keys=50)
    proc = start_relay_process(
        database_url, bootstrap_servers, extra_env={"OUTBOX_RELAY_BATCH_SIZE": "50"}
    )
    wait_until(lambda: _backlog(clean_db) < 2000, timeout=30, what="relay to start publishing")
    assert stop_process(proc) == 0
    left = _backlog(clean_db)
    received = read_topic(bootstrap_servers, topic, expect=2000 - left, timeout=30)
    # Every deleted event reached Kafka; nothing was published twice on a clean stop.
    assert len({r.event_id for r in received}) == 2000 - left == len(received)
    assert {r.event_id for r in received} <= set(ids)


def test_oversized_event_is_parked_without_stopping_others_and_can_be_replayed(
    clean_db: Engine, database_url: str, bootstrap_servers: str, admin: KafkaAdminClient
) -> None:
    topic = f"big-{uuid.uuid4().hex[:8]}"
    admin.create_topics([NewTopic(topic, 1, 1, topic_configs={"max.message.bytes": "3000000"})])
    with Session(clean_db) as session:
        before = outbox.publish(session, topic=topic, key="k", type="t", data={"n": 1})
        big = outbox.publish(
            session, topic=topic, key="k", type="t", data="x" * 1_500_000,
            max_payload_bytes=2_000_000,
        )
        after = outbox.publish(session, topic=topic, key="other", type="t", data={"n": 3})
        session.commit()
    # The producer's default max_request_size (1 MiB) refuses the big event.
    with relay_thread(_config(database_url, bootstrap_servers, max_attempts=2)) as relay:
        wait_until(lambda: _backlog(clean_db) == 0, timeout=30, what="backlog to drain")
        assert relay.parked == 1
    with clean_db.connect() as conn:
        parked = list_parked(conn)
        assert outbox_stats(conn).parked == 1
    assert [p.id for p in parked] == [big.id]
    assert "MessageSizeTooLarge" in parked[0].error
    received = read_topic(bootstrap_servers, topic, expect=2)
    assert {r.event_id for r in received} == {before.id, after.id}

    # The operator raises the producer limit and replays: the event goes out, same id.
    with clean_db.begin() as conn:
        assert replay_parked(conn) == 1
    config = _config(database_url, bootstrap_servers, kafka={"max_request_size": 3_000_000})
    with relay_thread(config):
        wait_until(lambda: _backlog(clean_db) == 0, timeout=30, what="replayed event")
    received = read_topic(bootstrap_servers, topic, expect=3)
    assert {r.event_id for r in received} == {before.id, big.id, after.id}


def test_two_relays_share_the_shards_and_one_takes_over_when_the_other_dies(
    clean_db: Engine, database_url: str, bootstrap_servers: str, topic: str, tmp_path: Path
) -> None:
    first = start_relay_process(database_url, bootstrap_servers, log_path=tmp_path / "a.log")
    second = start_relay_process(database_url, bootstrap_servers, log_path=tmp_path / "b.log")
    try:
        wait_until(lambda: len(_lease_owners(clean_db)) == 2, timeout=30, what="both relays to own shards")
        before = _write(clean_db, topic, 500, keys=40)
        wait_until(lambda: _backlog(clean_db) == 0, timeout=30, what="two relays")
        first.kill()
        first.wait()
        killed_at = time.monotonic()
        after = _write(clean_db, topic, 500, keys=40)
        wait_until(lambda: _backlog(clean_db) == 0, timeout=30, what="survivor to take over")
        takeover = time.monotonic() - killed_at
        assert len(_lease_owners(clean_db)) == 1
    finally:
        first.kill()
        stop_process(second)
    assert takeover < 3.0 + 5  # lease TTL (3 s by default) plus a few rounds
    received = read_topic(bootstrap_servers, topic, expect=1000)
    assert {r.event_id for r in received} == set(before + after)
    key_of = {r.event_id: r.key for r in received}
    _assert_in_commit_order(before + after, first_occurrences(received), key_of)


def _lease_owners(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(text(
            "SELECT owner FROM outbox_relay_lease WHERE owner IS NOT NULL AND expires_at > now()"
        )).scalars())


def test_confluent_publisher_keeps_commit_order_and_the_same_envelope(
    clean_db: Engine, database_url: str, bootstrap_servers: str, topic: str
) -> None:
    """The optional librdkafka publisher: same order per key, same CloudEvents headers."""
    ids = _write(clean_db, topic, 300, keys=7)
    with relay_thread(_config(database_url, bootstrap_servers, publisher="confluent")):
        wait_until(lambda: _backlog(clean_db) == 0, timeout=60, what="backlog to drain")
    received = read_topic(bootstrap_servers, topic, expect=300)
    assert sorted(r.event_id for r in received) == sorted(ids)
    assert received[0].headers["ce_specversion"] == b"1.0"
    key_of = {event_id: f"key-{i % 7}" for i, event_id in enumerate(ids)}
    _assert_in_commit_order(ids, first_occurrences(received), key_of)



def _row_locked(conn: psycopg.Connection[Any], shard: int) -> bool:
    try:
        with conn.transaction():
            conn.execute("SELECT 1 FROM outbox_relay_lease WHERE shard = %s FOR UPDATE NOWAIT", (shard,))
    except psycopg.errors.LockNotAvailable:
        return True
    return False


@pytest.mark.parametrize("statement", ["renewal", "fenced delete"])
def test_lease_rows_are_locked_in_shard_order_whatever_their_order_on_disk(
    clean_db: Engine, database_url: str, statement: str
) -> None:
    """The lease thread's renewal and the deleter's fenced delete lock the same
    lease rows. The delete took them in shard order, the renewal in the order
    its scan met them, which drifts as rows are rewritten: a 1M-event bench
    run died of DeadlockDetected between the two. Stopped at shard 8 by a lock
    held elsewhere, each must have taken 0-7 and none of 9-15, with the rows
    stored in reverse shard order."""
    with clean_db.begin() as conn:
        conn.execute(text("DELETE FROM outbox_relay_member"))
        conn.execute(text("UPDATE outbox_relay_lease SET owner = NULL, expires_at = NULL"))
    me = f"order-{uuid.uuid4().hex[:8]}"
    runner, holder, probe = (store.connect(database_url) for _ in range(3))
    try:
        leases, _ = store.heartbeat(runner, me, ttl=60, wanted_total=SHARDS)
        assert len(leases) == SHARDS
        with clean_db.begin() as conn:  # the same rows, stored in reverse shard order
            rows = conn.execute(text("SELECT * FROM outbox_relay_lease")).mappings().all()
            conn.execute(text("TRUNCATE outbox_relay_lease"))  # a new file: stored as inserted
            conn.execute(text("INSERT INTO outbox_relay_lease (shard, owner, epoch, expires_at)"
                              " VALUES (:shard, :owner, :epoch, :expires_at)"),
                         sorted((dict(r) for r in rows), key=lambda r: -r["shard"]))
            on_disk = conn.execute(text("SELECT shard FROM outbox_relay_lease ORDER BY ctid")).scalars().all()
        assert on_disk == sorted(on_disk, reverse=True)
        ids = [str(r[0]) for r in runner.execute(
            "INSERT INTO outbox_event (id, position, topic, key, type, payload, content_type, created_at)"
            " SELECT gen_random_uuid(), nextval('outbox_event_position_seq'), 't', 'k' || g, 't',"
            " '\\x00', 'application/json', now() FROM generate_series(1, 200) g RETURNING id"
        ).fetchall()]
        holder.execute("BEGIN")
        holder.execute("SELECT 1 FROM outbox_relay_lease WHERE shard = 8 FOR UPDATE")

        def run() -> None:
            if statement == "renewal":
                store.heartbeat(runner, me, ttl=60, wanted_total=SHARDS)
            else:
                store.delete_published_fenced(runner, me, ids, leases)

        thread = threading.Thread(target=run)
        thread.start()
        pid = runner.info.backend_pid
        wait_until(lambda: probe.execute("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s",
                                         (pid,)).fetchone() == (True,), timeout=10, what=f"the {statement} to wait")
        locked = {shard for shard in range(SHARDS) if shard != 8 and _row_locked(probe, shard)}
        holder.execute("COMMIT")
        thread.join(timeout=10)
        assert locked == set(range(8))
    finally:
        holder.close()
        store.leave(runner, me, list(range(SHARDS)))
        runner.close()
        probe.close()
