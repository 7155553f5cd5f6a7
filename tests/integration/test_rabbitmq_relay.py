"""The relay's RabbitMQ publisher against the real RabbitMQ and PostgreSQL."""

from __future__ import annotations

import signal
import threading
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

import outbox
from outbox.errors import ConfigError
from outbox.parked import list_parked
from outbox.rabbitmq_topology import Topology, declare
from outbox.schema import outbox_event
from relay import RelayConfig
from tests import services
from tests.kafka_helpers import relay_thread, run_relay_until_exit, start_relay_process, stop_process, wait_until
from tests.rabbitmq_helpers import (
    Topologies,
    channel,
    close_all_connections,
    drain_queues,
    first_by_key,
    queued,
    rabbit_relay_env,
)

pytestmark = pytest.mark.integration


def _write(engine: Engine, topic: str, n: int, *, keys: int = 10) -> list[uuid.UUID]:
    ids: list[uuid.UUID] = []
    with Session(engine) as session:
        for i in range(n):
            ids.append(outbox.publish(session, topic=topic, key=f"key-{i % keys}", type="payment.captured",
                                      data={"n": i}).id)
        session.commit()
    return ids


def _backlog(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(outbox_event)).scalar_one())


def _config(database_url: str, url: str, **kw: object) -> RelayConfig:
    return RelayConfig(database_url=database_url, publisher="rabbitmq", rabbitmq_url=url,
                       poll_interval=0.2, backoff_max=2.0, **kw)  # type: ignore[arg-type]


def _expected(ids: list[uuid.UUID], keys: int) -> dict[str, list[uuid.UUID]]:
    expected: dict[str, list[uuid.UUID]] = {}
    for i, event_id in enumerate(ids):
        expected.setdefault(f"key-{i % keys}", []).append(event_id)
    return expected


def test_rabbitmq_relay_publishes_cloudevents_persistent_and_in_commit_order_per_key(
    clean_db: Engine, database_url: str, rabbitmq_url: str, topologies: Topologies
) -> None:
    topology = topologies.make(queues=3)
    ids = _write(clean_db, topology.topic, 300, keys=7)
    with relay_thread(_config(database_url, rabbitmq_url, batch_size=64)):
        wait_until(lambda: _backlog(clean_db) == 0, timeout=60, what="backlog to drain")
    delivered = drain_queues(rabbitmq_url, topology)
    assert sorted(d.event_id for d in delivered) == sorted(ids)  # each exactly once
    assert first_by_key(delivered) == _expected(ids, 7)
    queue_of: dict[str, set[int]] = {}
    for d in delivered:
        queue_of.setdefault(d.key, set()).add(d.queue)
    assert all(len(queues) == 1 for queues in queue_of.values())  # one key, one queue
    first = delivered[0].properties
    assert first.delivery_mode == 2 and first.content_type == "application/json"
    assert first.headers["cloudEvents:specversion"] == "1.0"
    assert first.headers["cloudEvents:id"] == first.message_id
    assert first.headers["cloudEvents:source"] == "outbox-relay"
    assert first.headers["cloudEvents:type"] == "payment.captured"
    assert first.headers["cloudEvents:time"].endswith("Z")


def test_concurrent_same_key_transactions_reach_rabbitmq_in_commit_order(
    clean_db: Engine, database_url: str, rabbitmq_url: str, topologies: Topologies
) -> None:
    """T1 begins and writes first; T2 writes and commits first; the queue holds T2, then T1."""
    topology = topologies.make(queues=2)
    t1, t2 = Session(clean_db), Session(clean_db)
    try:
        first = outbox.publish(t1, topic=topology.topic, key="pay-1", type="payment.authorised", data={})
        t1.flush()
        second = outbox.publish(t2, topic=topology.topic, key="pay-1", type="payment.captured", data={})
        t2.flush()
        t2.commit()
        t1.commit()
    finally:
        t1.close()
        t2.close()
    with relay_thread(_config(database_url, rabbitmq_url)):
        wait_until(lambda: _backlog(clean_db) == 0, timeout=30, what="backlog to drain")
    assert first_by_key(drain_queues(rabbitmq_url, topology)) == {"pay-1": [second.id, first.id]}


def test_unroutable_and_missing_exchanges_are_parked_with_their_error_and_the_rest_go_on(
    clean_db: Engine, database_url: str, rabbitmq_url: str, topologies: Topologies
) -> None:
    good = topologies.make(queues=2)
    unbound = topologies.make(group=None)  # an exchange with no queue behind it
    missing = f"rt-missing-{uuid.uuid4().hex[:8]}"
    with Session(clean_db) as session:
        lost_a = outbox.publish(session, topic=unbound.topic, key="k", type="t", data={"n": 0})
        lost_b = outbox.publish(session, topic=missing, key="k", type="t", data={"n": 0})
        session.commit()
    ids = _write(clean_db, good.topic, 50, keys=5)
    with relay_thread(_config(database_url, rabbitmq_url, max_attempts=2)) as relay:
        wait_until(lambda: _backlog(clean_db) == 0, timeout=60, what="good events out, bad ones parked")
    assert relay.parked == 2
    assert first_by_key(drain_queues(rabbitmq_url, good)) == _expected(ids, 5)
    with clean_db.connect() as conn:
        parked = {p.id: p for p in list_parked(conn)}
    assert set(parked) == {lost_a.id, lost_b.id}
    assert parked[lost_a.id].error.startswith(f"Unroutable: nothing is bound to exchange '{unbound.topic}'")
    assert parked[lost_b.id].error.startswith(f"UnknownExchange: exchange '{missing}' does not exist")
    assert "outbox rabbitmq declare" in parked[lost_b.id].error


@pytest.mark.parametrize("window", [1, 4])
def test_rabbitmq_relay_killed_between_confirm_and_delete_publishes_the_same_ids_again(
    clean_db: Engine, database_url: str, bootstrap_servers: str, rabbitmq_url: str,
    topologies: Topologies, tmp_path: Path, window: int,
) -> None:
    """A crash republishes at most the window in flight (`window` batches), with the same ids."""
    topology = topologies.make(queues=4)
    ids = _write(clean_db, topology.topic, 1000, keys=13)
    # SIGKILL itself after the broker confirmed its 3rd batch, before deleting it.
    proc = start_relay_process(database_url, bootstrap_servers, log_path=tmp_path / "relay.log",
                               extra_env=rabbit_relay_env(rabbitmq_url, OUTBOX_FAILPOINT="relay-after-ack:3",
                                                          OUTBOX_RELAY_BATCH_SIZE="100",
                                                          OUTBOX_RELAY_MAX_IN_FLIGHT=str(window)))
    assert proc.wait(timeout=60) == -signal.SIGKILL
    # Two batches deleted; the third confirmed but not deleted. With a window,
    # deletes run beside the sending: the first two may still have been queued
    # at the kill (they count in the window).
    backlog = _backlog(clean_db)
    assert backlog == 800 if window == 1 else 800 <= backlog <= 1000
    proc = start_relay_process(database_url, bootstrap_servers, log_path=tmp_path / "relay.log",
                               extra_env=rabbit_relay_env(rabbitmq_url))
    try:
        wait_until(lambda: _backlog(clean_db) == 0, timeout=60, what="backlog to drain")
    finally:
        assert stop_process(proc) == 0
    delivered = drain_queues(rabbitmq_url, topology)
    assert {d.event_id for d in delivered} == set(ids)  # nothing lost
    duplicates = len(delivered) - len(ids)
    # The batch confirmed but not deleted, and at most the window sent after it; same ids.
    assert 100 <= duplicates <= window * 100
    if window == 1:
        assert duplicates == 100
    assert first_by_key(delivered) == _expected(ids, 13)


# What the relay logs when it meets a lost connection: a round that failed on it and
# then worked, or (lost between rounds) the reconnect before the next one.
NOTICED = ("relay works again after", "rabbitmq: connection lost")


def _relay_noticed(log: Path, *, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if any(line in log.read_text() for line in NOTICED):
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("fault", ["broker restarted", "connections closed by the server"])
def test_rabbitmq_outage_under_load_loses_nothing_and_keeps_key_order(
    clean_db: Engine, database_url: str, bootstrap_servers: str, rabbitmq_url: str,
    topologies: Topologies, tmp_path: Path, fault: str,
) -> None:
    topology = topologies.make(queues=4)
    written: list[uuid.UUID] = []
    key_of: dict[uuid.UUID, str] = {}
    stop_writing = threading.Event()

    def writer() -> None:
        while not stop_writing.is_set():
            batch = _write(clean_db, topology.topic, 20, keys=5)
            key_of.update({event_id: f"key-{i % 5}" for i, event_id in enumerate(batch)})
            written.extend(batch)
            time.sleep(0.02)

    proc = start_relay_process(database_url, bootstrap_servers, log_path=tmp_path / "relay.log",
                               extra_env=rabbit_relay_env(rabbitmq_url))
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        wait_until(lambda: queued(rabbitmq_url, topology) > 100, timeout=60, what="the relay at work")
        if fault == "broker restarted":
            services.restart_rabbitmq()  # SIGKILL the node, start it again, wait until it booted
        else:
            # The node tracks a new connection a moment after it opened, and
            # close_all_connections closes only tracked ones: close again until
            # the fault has reached the relay.
            for attempt in range(6):
                close_all_connections(rabbitmq_url, at_least_one=attempt == 0)
                if _relay_noticed(tmp_path / "relay.log", within=10):
                    break
        # Writing goes on until the relay has met the fault: a connection closed between
        # two rounds is noticed only by the next publish.
        assert _relay_noticed(tmp_path / "relay.log", within=60), "the relay never met the fault"
        stop_writing.set()
        thread.join()
        wait_until(lambda: _backlog(clean_db) == 0, timeout=120, what="backlog to drain")
        assert proc.poll() is None, "the relay must ride out the outage, not exit"
    finally:
        stop_writing.set()
        thread.join()
        stop_process(proc)
    with clean_db.connect() as conn:
        assert list_parked(conn) == []  # an outage parks nothing
    delivered = drain_queues(rabbitmq_url, topology)
    assert {d.event_id for d in delivered} == set(written)
    expected: dict[str, list[uuid.UUID]] = {}
    for event_id in written:
        expected.setdefault(key_of[event_id], []).append(event_id)
    assert first_by_key(delivered) == expected


def test_a_wrong_rabbitmq_password_is_one_line_without_the_secret(
    database_url: str, bootstrap_servers: str, rabbitmq_url: str
) -> None:
    user = rabbitmq_url.split("://", 1)[1].split(":", 1)[0]
    wrong = rabbitmq_url.replace(rabbitmq_url.split("://", 1)[1].split("@", 1)[0], f"{user}:n0t-the-pw-31")
    exited = run_relay_until_exit(database_url, bootstrap_servers,
                                  extra_env=rabbit_relay_env(wrong))
    assert exited.returncode == 2
    assert "n0t-the-pw-31" not in exited.output
    lines = [line for line in exited.output.splitlines() if line.startswith("outbox relay:")]
    assert lines == [
        f"outbox relay: OUTBOX_RABBITMQ_URL: the broker at amqp://{user}:***@"
        f"{wrong.split('@', 1)[1].replace('%2F', '/')} refused the login (ACCESS_REFUSED); "
        "check the user and password in OUTBOX_RABBITMQ_URL"
    ]


def test_declare_is_idempotent_and_refuses_another_queue_count_for_a_group(
    rabbitmq_url: str, topologies: Topologies
) -> None:
    topology = topologies.make(queues=3)
    with channel(rabbitmq_url) as ch:
        declare(ch, topology)  # again: nothing changes
        for other in (2, 4):
            with pytest.raises(ConfigError, match="exists with another number of queues than"):
                declare(ch, Topology(topic=topology.topic, group=topology.group, queues=other))
