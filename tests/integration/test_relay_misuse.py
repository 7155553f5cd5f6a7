"""The relay against misuse: wrong settings, missing topics, a duplicate relay id.

Each one must cost one clear line naming the setting (never a secret) and no
event, against the real PostgreSQL and the real Kafka broker.
"""

from __future__ import annotations

import gc
import logging
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from kafka.admin import KafkaAdminClient
from psycopg import sql
from sqlalchemy import Engine, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

import outbox
from outbox.parked import list_parked
from outbox.schema import PUBLISHED_BUCKET_PREFIX, PUBLISHED_COUNTER, SHARDS, outbox_event
from outbox.writer import DEFAULT_MAX_PAYLOAD_BYTES
from relay import RelayConfig, store
from relay.leases import ShardLeases
from tests.kafka_helpers import (
    SASL_PASSWORD,
    SASL_USERNAME,
    Exited,
    first_occurrences,
    read_topic,
    relay_thread,
    run_relay_until_exit,
    sasl_bootstrap_servers,
    start_relay_process,
    stop_process,
    wait_until,
)

pytestmark = pytest.mark.integration


def _write(engine: Engine, topic: str, n: int, *, keys: int = 3) -> list[uuid.UUID]:
    with Session(engine) as session:
        ids = [
            outbox.publish(session, topic=topic, key=f"key-{i % keys}", type="t", data={"n": i}).id
            for i in range(n)
        ]
        session.commit()
    return ids


def _backlog(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(outbox_event)).scalar_one()


def test_prepared_statements_made_on_an_empty_outbox_delete_a_batch_of_a_large_one_by_index(
    clean_db: Engine, database_url: str
) -> None:
    """A generic plan fixed while the table was empty would scan all of it for
    every 500-id delete of a later backlog (the stall after a quiet period)."""
    me = f"plan-{uuid.uuid4().hex[:8]}"
    conn = store.connect(database_url)
    try:
        leases, _ = store.heartbeat(conn, me, ttl=120, wanted_total=SHARDS)
        assert len(leases) == SHARDS
        # Past psycopg's prepare threshold (5) and PostgreSQL's custom-plan trial (5).
        for _ in range(12):
            assert store.fetch_shards(conn, sorted(leases), 500) == []
            assert store.delete_published_fenced(conn, me, [str(uuid.uuid4())], leases) == 0
        with clean_db.begin() as db:
            db.execute(text(
                "INSERT INTO outbox_event (id, topic, key, type, payload, content_type,"
                " created_at, position)"
                " SELECT gen_random_uuid(), 'plan', 'k' || g, 't', '\\x00'::bytea,"
                " 'application/json', now(), g FROM generate_series(1, 200000) g"
            ))
            ids = [str(i) for i in db.execute(text(
                "SELECT id FROM outbox_event ORDER BY random() LIMIT 500"
            )).scalars()]

        started = time.monotonic()
        assert store.delete_published_fenced(conn, me, ids, leases) == 500
        elapsed = time.monotonic() - started
        assert len(store.fetch_shards(conn, sorted(leases), 500)) == 500

        plans = conn.execute(
            "SELECT name, statement, generic_plans, custom_plans FROM pg_prepared_statements"
        ).fetchall()
        delete = [p for p in plans if "DELETE FROM outbox_event" in p[1]]
        assert delete, plans
        assert [(p[1][:60], p[2]) for p in plans if p[2]] == []  # no statement got a generic plan
        # The plan the next execution gets, for a full batch that is still there.
        more = [str(r[0]) for r in conn.execute("SELECT id FROM outbox_event LIMIT 500").fetchall()]
        shards = sorted(leases)
        with conn.transaction(force_rollback=True):
            args = (shards, [leases[s] for s in shards], me, ",".join(more), PUBLISHED_COUNTER,
                    PUBLISHED_BUCKET_PREFIX)
            explained = "\n".join(row[0] for row in conn.execute(
                sql.SQL("EXPLAIN (ANALYZE) EXECUTE {}({})").format(
                    sql.Identifier(delete[0][0]), sql.SQL(", ").join(map(sql.Literal, args))
                )
            ).fetchall())
        shape = "\n".join(line[:120] for line in explained.splitlines())
        assert re.search(r"Index Scan (using|on) outbox_event_pkey", explained), shape  # or bitmap
        assert "Seq Scan on outbox_event " not in explained, shape
        # A sequential scan comparing 200,000 rows with 500 ids takes seconds.
        assert elapsed < 1.0, f"500-id delete took {elapsed:.2f}s"
    finally:
        store.leave(conn, me, list(range(SHARDS)))
        conn.close()
        with clean_db.begin() as db:
            db.execute(text("TRUNCATE outbox_event"))


# -- settings that waiting cannot fix: one line, exit 2, no secret -------------

def _refusal(exited: Exited) -> str:
    """The one line the relay ends with (asserting there is exactly one)."""
    lines = [line for line in exited.output.splitlines() if line.startswith("outbox relay: ")]
    assert exited.returncode == 2, exited.output[-3000:]
    assert len(lines) == 1, exited.output[-3000:]
    return lines[0]


@pytest.mark.parametrize("publisher", ["kafka-python", "confluent"])
def test_a_wrong_sasl_password_exits_at_start_with_one_line_naming_the_setting(
    database_url: str, bootstrap_servers: str, publisher: str
) -> None:
    wrong = f"wrong-{uuid.uuid4().hex[:8]}"
    exited = run_relay_until_exit(
        database_url, sasl_bootstrap_servers(bootstrap_servers), extra_env={
            "OUTBOX_RELAY_PUBLISHER": publisher,
            "OUTBOX_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "OUTBOX_KAFKA_SASL_MECHANISM": "PLAIN",
            "OUTBOX_KAFKA_SASL_PLAIN_USERNAME": SASL_USERNAME,
            "OUTBOX_KAFKA_SASL_PLAIN_PASSWORD": wrong,
        },
        # It exits on its own (an outage would be waited out for ever); the bound
        # is generous because start-up alone took 15-20 s on a loaded CI machine.
        timeout=60,
    )
    line = _refusal(exited)
    assert "OUTBOX_KAFKA_SASL_PLAIN_PASSWORD" in line and "refused the SASL login" in line
    assert wrong not in exited.output


def test_the_right_sasl_password_publishes_through_the_sasl_listener(
    clean_db: Engine, database_url: str, bootstrap_servers: str, topic: str
) -> None:
    ids = _write(clean_db, topic, 5)
    sasl = {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN",
            "sasl_plain_username": SASL_USERNAME, "sasl_plain_password": SASL_PASSWORD}
    config = RelayConfig(database_url=database_url, poll_interval=0.2,
                         bootstrap_servers=sasl_bootstrap_servers(bootstrap_servers), kafka=sasl)
    with relay_thread(config):
        wait_until(lambda: _backlog(clean_db) == 0, timeout=30, what="backlog to drain")
    assert {r.event_id for r in read_topic(bootstrap_servers, topic, expect=5)} == set(ids)


def test_a_wrong_database_password_exits_at_start_with_one_line_and_no_password(
    database_url: str, bootstrap_servers: str
) -> None:
    wrong = f"wrong-{uuid.uuid4().hex[:8]}"
    url = make_url(database_url).set(password=wrong).render_as_string(hide_password=False)
    exited = run_relay_until_exit(url, bootstrap_servers, timeout=20)
    line = _refusal(exited)
    assert "OUTBOX_DATABASE_URL" in line and "refused the password" in line
    assert wrong not in exited.output


def test_a_password_in_the_url_query_never_appears_in_the_relay_output(
    database_url: str, bootstrap_servers: str
) -> None:
    secret = f"query-{uuid.uuid4().hex[:8]}"
    url = make_url(database_url).set(password=None).update_query_dict({"password": secret})
    exited = run_relay_until_exit(url.render_as_string(hide_password=False), bootstrap_servers)
    assert "relay starting: database=" in exited.output  # the start line was printed
    _refusal(exited)
    assert secret not in exited.output


def test_a_database_without_the_kit_tables_exits_and_says_run_outbox_db_upgrade(
    engine: Engine, database_url: str, bootstrap_servers: str
) -> None:
    """Before: the relay found no leases there and logged a failure every second, forever."""
    schema = f"empty_{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        url = make_url(database_url).update_query_dict({"options": f"-c search_path={schema}"})
        exited = run_relay_until_exit(url.render_as_string(hide_password=False), bootstrap_servers)
        line = _refusal(exited)
        assert "run `outbox db upgrade`" in line and "outbox_event" in line
        assert exited.seconds < 15
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema}"))


@pytest.mark.parametrize("publisher", ["kafka-python", "confluent"])
def test_a_kafka_value_the_client_refuses_exits_at_start_naming_the_variable(
    database_url: str, bootstrap_servers: str, publisher: str
) -> None:
    """Before: confluent's `_INVALID_ARG` was called a broker outage and retried forever."""
    exited = run_relay_until_exit(database_url, bootstrap_servers, extra_env={
        "OUTBOX_RELAY_PUBLISHER": publisher, "OUTBOX_KAFKA_COMPRESSION_TYPE": "bogus",
    })
    line = _refusal(exited)
    assert "OUTBOX_KAFKA_COMPRESSION_TYPE" in line and "bogus" in line


def test_confluent_refuses_linger_ms_out_of_its_range_naming_the_variable(
    database_url: str, bootstrap_servers: str
) -> None:
    """librdkafka names the setting queue.buffering.max.ms; the line names what the user set."""
    exited = run_relay_until_exit(database_url, bootstrap_servers, extra_env={
        "OUTBOX_RELAY_PUBLISHER": "confluent", "OUTBOX_KAFKA_LINGER_MS": "-5",
    })
    assert "OUTBOX_KAFKA_LINGER_MS" in _refusal(exited)


@pytest.mark.parametrize("publisher", ["kafka-python", "confluent"])
def test_linger_ms_zero_is_a_number_for_both_publishers_and_events_go_out(
    clean_db: Engine, database_url: str, bootstrap_servers: str, topic: str, publisher: str
) -> None:
    ids = _write(clean_db, topic, 5)
    config = RelayConfig.from_env({
        "OUTBOX_DATABASE_URL": database_url, "OUTBOX_KAFKA_BOOTSTRAP_SERVERS": bootstrap_servers,
        "OUTBOX_KAFKA_LINGER_MS": "0", "OUTBOX_RELAY_PUBLISHER": publisher,
        "OUTBOX_RELAY_POLL_INTERVAL": "0.2",
    })
    assert config.kafka["linger_ms"] == 0 and config.kafka["linger_ms"] is not False
    with relay_thread(config):
        wait_until(lambda: _backlog(clean_db) == 0, timeout=30, what="backlog to drain")
    assert {r.event_id for r in read_topic(bootstrap_servers, topic, expect=5)} == set(ids)


# -- one relay id, one process -------------------------------------------------

def test_a_second_relay_with_the_same_id_is_refused_at_start(
    clean_db: Engine, database_url: str, bootstrap_servers: str, tmp_path: Path
) -> None:
    """Before: two relays with one OUTBOX_RELAY_ID shared its leases and
    published 16,985 duplicates of 24,980 events without a word."""
    relay_id = f"dup-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "first.log"
    first = start_relay_process(database_url, bootstrap_servers, log_path=log,
                                extra_env={"OUTBOX_RELAY_ID": relay_id})
    try:
        wait_until(lambda: "shard leases:" in log.read_text(), timeout=30, what="first relay's leases")
        second = run_relay_until_exit(database_url, bootstrap_servers, timeout=20,
                                      extra_env={"OUTBOX_RELAY_ID": relay_id})
        line = _refusal(second)
        assert "OUTBOX_RELAY_ID" in line and relay_id in line and "another live relay" in line
        assert first.poll() is None  # the first one goes on
    finally:
        assert stop_process(first) == 0
    # The id is free again once its process is gone.
    wait_until(lambda: "relay stopped" in log.read_text(), timeout=5)
    again = start_relay_process(database_url, bootstrap_servers, log_path=log,
                                extra_env={"OUTBOX_RELAY_ID": relay_id})
    try:
        wait_until(lambda: log.read_text().count("shard leases:") >= 2, timeout=30,
                   what="a new relay with the freed id")
    finally:
        assert stop_process(again) == 0


# -- settings read and shown ----------------------------------------------------


# -- a topic that does not exist -------------------------------------------------

@pytest.mark.parametrize("publisher", ["kafka-python", "confluent"])
def test_events_for_a_missing_topic_are_parked_and_the_others_go_out_in_order(
    clean_db: Engine, database_url: str, bootstrap_servers: str, topic: str, publisher: str
) -> None:
    """Before: each key of the missing topic blocked a round for max_block_ms, a
    round of only such events counted as an outage, and nothing was published."""
    missing = f"missing-{uuid.uuid4().hex[:8]}"  # the broker does not create topics
    good: list[uuid.UUID] = []
    lost: list[uuid.UUID] = []
    with Session(clean_db) as session:
        for i in range(40):
            if i % 4 == 0:
                lost.append(outbox.publish(session, topic=missing, key=f"m-{i % 3}", type="t",
                                           data={"n": i}).id)
            good.append(outbox.publish(session, topic=topic, key=f"g-{i % 5}", type="t",
                                       data={"n": i}).id)
        session.commit()
    started = time.monotonic()
    config = RelayConfig(database_url=database_url, bootstrap_servers=bootstrap_servers,
                         poll_interval=0.2, backoff_initial=0.05, max_attempts=3,
                         publisher=publisher, batch_size=16)
    with relay_thread(config) as relay:
        wait_until(lambda: _backlog(clean_db) == 0, timeout=60, what="backlog to drain")
        assert relay.parked == len(lost)
    assert time.monotonic() - started < 30
    with clean_db.connect() as conn:
        parked = list_parked(conn)
    assert sorted(p.id for p in parked) == sorted(lost)
    assert all(missing in p.error and "does not exist" in p.error for p in parked)
    assert all(p.attempts == 3 for p in parked)
    received = read_topic(bootstrap_servers, topic, expect=len(good))
    by_key = first_occurrences(received)
    expected: dict[str, list[uuid.UUID]] = {}
    for i, event_id in enumerate(good):
        expected.setdefault(f"g-{i % 5}", []).append(event_id)
    assert by_key == expected


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_a_topic_deleted_after_the_relay_saw_it_costs_one_wait_per_round_not_one_per_key(
    clean_db: Engine, database_url: str, bootstrap_servers: str, topic: str,
    make_topic: Callable[..., str], admin: KafkaAdminClient,
) -> None:
    """kafka-python's send() waits max_block_ms for a topic it has no metadata
    for; before, each key of a deleted topic waited that long in every round."""
    doomed = make_topic("doomed")
    config = RelayConfig(
        database_url=database_url, bootstrap_servers=bootstrap_servers, poll_interval=0.2,
        backoff_initial=0.05, max_attempts=2, batch_size=100,
        kafka={"max_block_ms": 3_000, "request_timeout_ms": 2_000, "delivery_timeout_ms": 4_000},
    )
    with relay_thread(config) as relay:
        _write(clean_db, doomed, 1)
        wait_until(lambda: _backlog(clean_db) == 0, timeout=30, what="the doomed topic to be seen")
        admin.delete_topics([doomed])
        wait_until(lambda: doomed not in admin.list_topics(), timeout=30, what="the topic to go")
        lost = _write(clean_db, doomed, 20, keys=20)  # 20 keys: 60 s a round before
        good = _write(clean_db, topic, 20, keys=5)
        started = time.monotonic()
        wait_until(lambda: _backlog(clean_db) == 0, timeout=60, what="backlog to drain")
        took = time.monotonic() - started
        assert relay.parked == len(lost)
    assert took < 30, f"{took:.1f} s"
    assert len(read_topic(bootstrap_servers, topic, expect=len(good))) >= len(good)
    # Every producer the failed rounds dropped was closed for good: kafka-python's
    # close() gives up at its flush while records are pending, and the
    # half-closed producer's __del__ then printed a traceback to stderr.
    gc.collect()


def test_sigterm_ends_the_relay_within_seconds_while_a_topic_is_missing(
    clean_db: Engine, database_url: str, bootstrap_servers: str, tmp_path: Path
) -> None:
    """Before: SIGTERM took 102 s, each key waiting out max_block_ms first."""
    missing = f"missing-{uuid.uuid4().hex[:8]}"
    _write(clean_db, missing, 30, keys=30)
    log = tmp_path / "relay.log"
    proc = start_relay_process(database_url, bootstrap_servers, log_path=log,
                               extra_env={"OUTBOX_RELAY_MAX_ATTEMPTS": "1000"})
    try:
        wait_until(lambda: "does not exist" in log.read_text(), timeout=30,
                   what="a failed publish to the missing topic")
    finally:
        started = time.monotonic()
        assert stop_process(proc, timeout=30) == 0
    assert time.monotonic() - started < 5, log.read_text()[-3000:]
    assert _backlog(clean_db) == 30  # nothing lost, nothing parked before max_attempts


# -- size limits -------------------------------------------------------------------

@pytest.mark.parametrize("publisher", ["kafka-python", "confluent"])
def test_an_event_at_the_publish_size_limit_goes_out_through_either_publisher(
    clean_db: Engine, database_url: str, bootstrap_servers: str, topic: str, publisher: str
) -> None:
    """Whatever `publish` accepts (key + data + headers = 1,000,000 bytes by
    default) the relay sends with its defaults, the CloudEvents headers on top."""
    key = "k"
    headers = {"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"}
    room = DEFAULT_MAX_PAYLOAD_BYTES - len(key) - sum(len(k) + len(v) for k, v in headers.items())
    with Session(clean_db) as session:
        event = outbox.publish(session, topic=topic, key=key, type="document.stored",
                               data=b"x" * room, headers=headers)
        session.commit()
    config = RelayConfig(database_url=database_url, bootstrap_servers=bootstrap_servers,
                         poll_interval=0.2, max_attempts=1, publisher=publisher)
    with relay_thread(config) as relay:
        wait_until(lambda: _backlog(clean_db) == 0, timeout=30, what="the event to go")
        assert relay.parked == 0
    received = read_topic(bootstrap_servers, topic, expect=1)
    assert [r.event_id for r in received] == [event.id]
    assert len(received[0].value) == room


# -- after a good start: waited out, said once ------------------------------------

def test_lease_renewal_failing_for_one_cause_is_logged_once_and_its_end_too(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A password rotated under a running relay: one line, not one per renewal."""
    wrong = make_url(database_url).set(password="rotated-away").render_as_string(hide_password=False)
    leases = ShardLeases(wrong, f"once-{uuid.uuid4().hex[:8]}", ttl=3)
    with caplog.at_level(logging.INFO, logger="relay.leases"):
        for _ in range(4):
            leases.beat()
        leases._database_url = database_url  # the operator fixed the secret
        leases.beat()
    leases.stop()
    messages = [r.getMessage() for r in caplog.records]
    failed = [m for m in messages if "lease renewal failed" in m]
    assert len(failed) == 1 and "password authentication failed" in failed[0], messages
    assert "rotated-away" not in "\n".join(messages)
    assert any("lease renewal works again" in m for m in messages), messages


def test_an_unreachable_broker_is_waited_out_and_logged_once(
    clean_db: Engine, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = RelayConfig(database_url=database_url, bootstrap_servers="127.0.0.1:1",
                         poll_interval=0.2, backoff_initial=0.05, backoff_max=0.2)
    with caplog.at_level(logging.DEBUG, logger="relay.relay"), relay_thread(config):
        wait_until(lambda: sum("relay round failed" in r.getMessage() for r in caplog.records) >= 3,
                   timeout=30, what="three failed attempts")
    failed = [r for r in caplog.records if "relay round failed" in r.getMessage()]
    assert [r.levelno for r in failed].count(logging.WARNING) == 1, [r.getMessage() for r in failed]
