"""`Consumer(..., transport=RabbitMQ())` against the real RabbitMQ, PostgreSQL and relay."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pika
import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session

import outbox
from outbox.consumer import Consumer, ConsumerConfig
from outbox.dead_letters import list_dead_letters
from outbox.errors import ConfigError
from outbox.event import Event
from outbox.rabbitmq import RabbitMQ
from outbox.rabbitmq_topology import Topology, routing_bucket
from outbox.schema import outbox_event
from relay import RelayConfig
from tests import services
from tests.consumer_proc import record_effect
from tests.kafka_helpers import relay_thread, start_relay_process, stop_process, wait_until
from tests.rabbitmq_helpers import Topologies, channel, close_all_connections, queued, rabbit_relay_env

pytestmark = pytest.mark.integration


def _write(engine: Engine, topic: str, n: int, *, keys: int = 10, start: int = 0) -> list[uuid.UUID]:
    ids: list[uuid.UUID] = []
    with Session(engine) as session:
        for i in range(start, start + n):
            ids.append(outbox.publish(session, topic=topic, key=f"key-{i % keys}", type="t",
                                      data={"n": i}).id)
        session.commit()
    return ids


def _backlog(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(outbox_event)).scalar_one())


def _effects(engine: Engine, topic: str) -> list[tuple[uuid.UUID, int]]:
    """(event id, n) per application, in the order they were applied."""
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT event_id, (data->>'n')::int FROM test_consumer_effect WHERE topic = :t"
            " ORDER BY applied_at, ctid"), {"t": topic}).all()
    return [(r[0], r[1]) for r in rows]


def _relay_config(database_url: str, url: str) -> RelayConfig:
    return RelayConfig(database_url=database_url, publisher="rabbitmq", rabbitmq_url=url,
                       poll_interval=0.2, backoff_max=2.0)


def _consumer(engine: Engine, topology: Topology, url: str, handler: object = record_effect) -> Consumer:
    return Consumer(engine, group=topology.group, topics=[topology.topic], handler=handler,  # type: ignore[arg-type]
                    config=ConsumerConfig(poll_timeout_ms=200, max_attempts=2, retry_backoff_base=0.01,
                                          retry_backoff_max=0.05),
                    transport=RabbitMQ(url, queues=topology.queues))


def _drain(consumer: Consumer, done: object, timeout: float = 60) -> None:
    assert callable(done)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if consumer.run_once(200) == 0 and done():
            return
    raise AssertionError(f"consumer did not finish in {timeout}s: {consumer.stats}")


def _in_key_order(applied: list[tuple[uuid.UUID, int]], keys: int) -> bool:
    by_key: dict[int, list[int]] = {}
    for _, n in applied:
        by_key.setdefault(n % keys, []).append(n)
    return all(ns == sorted(ns) for ns in by_key.values())


def test_rabbitmq_consumer_applies_every_event_once_in_commit_order_and_skips_redeliveries(
    clean_db: Engine, effects: Engine, database_url: str, rabbitmq_url: str, topologies: Topologies
) -> None:
    topology = topologies.make(queues=3)
    ids = _write(clean_db, topology.topic, 400, keys=9)
    with relay_thread(_relay_config(database_url, rabbitmq_url)):
        wait_until(lambda: _backlog(clean_db) == 0, timeout=60, what="relay to publish")
    with _consumer(clean_db, topology, rabbitmq_url) as consumer:
        _drain(consumer, lambda: len(_effects(clean_db, topology.topic)) >= 400)
        # The same events published a second time (a relay that crashed before its delete).
        with relay_thread(_relay_config(database_url, rabbitmq_url)):
            with Session(clean_db) as session:
                for i, event_id in enumerate(ids):
                    outbox.publish(session, topic=topology.topic, key=f"key-{i % 9}", type="t",
                                   data={"n": i}, event_id=event_id)
                session.commit()
            wait_until(lambda: _backlog(clean_db) == 0, timeout=60, what="republish")
        _drain(consumer, lambda: consumer.stats.duplicates >= 400)
    applied = _effects(clean_db, topology.topic)
    assert sorted(event_id for event_id, _ in applied) == sorted(ids)  # once each
    assert _in_key_order(applied, 9)
    assert consumer.stats.applied == 400 and consumer.stats.duplicates == 400
    assert queued(rabbitmq_url, topology) == 0  # all acknowledged


def test_malformed_message_is_dead_lettered_at_once_and_acknowledged(
    clean_db: Engine, effects: Engine, rabbitmq_url: str, topologies: Topologies
) -> None:
    topology = topologies.make(queues=2)
    with channel(rabbitmq_url) as ch:
        ch.confirm_delivery()
        ch.basic_publish(topology.topic, routing_bucket(b"k"), b"not json", pika.BasicProperties(
            content_type="application/json", message_id="m-1", delivery_mode=2,
            headers={"cloudEvents:specversion": "1.0", "cloudEvents:id": str(uuid.uuid4()),
                     "cloudEvents:type": "t", "cloudEvents:source": "elsewhere"}), mandatory=True)
        ch.basic_publish(topology.topic, routing_bucket(b"k"), b"{}", pika.BasicProperties(headers={"x": "1"}),
                         mandatory=True)
    with _consumer(clean_db, topology, rabbitmq_url) as consumer:
        _drain(consumer, lambda: consumer.stats.dead_lettered >= 2, timeout=30)
    assert consumer.stats.retries == 0  # no retries for what can never be decoded
    with clean_db.connect() as conn:
        letters = list_dead_letters(conn, group=topology.group)
    assert len(letters) == 2
    assert {letter.topic for letter in letters} == {topology.topic}
    assert any("data is not valid application/json" in letter.error for letter in letters)
    assert queued(rabbitmq_url, topology) == 0


def _consumer_process(topology: Topology, expect: int, database_url: str, rabbitmq_url: str,
                      **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.consumer_proc", "--group", topology.group, "--topic", topology.topic,
         "--expect", str(expect), "--transport", "rabbitmq", "--queues", str(topology.queues),
         "--transaction-batch-size", "10"],
        cwd=services.REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "OUTBOX_DATABASE_URL": database_url, "OUTBOX_RABBITMQ_URL": rabbitmq_url,
             **env},
        check=False,
    )


def test_rabbitmq_consumer_killed_between_db_commit_and_ack_applies_each_event_once(
    clean_db: Engine, effects: Engine, database_url: str, rabbitmq_url: str, topologies: Topologies
) -> None:
    topology = topologies.make(queues=2)
    ids = _write(clean_db, topology.topic, 60, keys=4)
    with relay_thread(_relay_config(database_url, rabbitmq_url)):
        wait_until(lambda: _backlog(clean_db) == 0, timeout=60, what="relay to publish")
    killed = _consumer_process(topology, 60, database_url, rabbitmq_url,
                               OUTBOX_FAILPOINT="consumer-after-db-commit:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    committed = len(_effects(clean_db, topology.topic))
    assert committed >= 2  # two transactions committed, their acks never sent
    restarted = _consumer_process(topology, 60, database_url, rabbitmq_url)
    assert restarted.returncode == 0, restarted.stderr[-2000:]
    stats = json.loads(restarted.stdout.strip().splitlines()[-1])
    assert stats["duplicates"] >= 1  # the unacknowledged, already applied messages came again
    applied = _effects(clean_db, topology.topic)
    assert sorted(event_id for event_id, _ in applied) == sorted(ids)  # applied once each
    assert _in_key_order(applied, 4)


@pytest.mark.parametrize("fault", ["broker restarted", "connections closed by the server"])
def test_rabbitmq_outage_under_load_between_relay_and_consumers_loses_nothing_and_applies_nothing_twice(
    clean_db: Engine, effects: Engine, database_url: str, bootstrap_servers: str, rabbitmq_url: str,
    topologies: Topologies, tmp_path: Path, fault: str,
) -> None:
    """Relay and two consumer processes of one group (one active per queue, one waiting);
    the broker is SIGKILLed and restarted, or every connection is closed, under load."""
    topology = topologies.make(queues=4)
    written: list[uuid.UUID] = []
    stop_writing = threading.Event()

    def writer() -> None:
        n = 0
        while not stop_writing.is_set():
            written.extend(_write(clean_db, topology.topic, 10, keys=6, start=n))
            n += 10
            time.sleep(0.03)

    env = {**rabbit_relay_env(rabbitmq_url), "OUTBOX_RABBITMQ_URL": rabbitmq_url}
    relay = start_relay_process(database_url, bootstrap_servers, log_path=tmp_path / "relay.log", extra_env=env)
    consumers = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.consumer_proc", "--group", topology.group, "--topic", topology.topic,
             "--transport", "rabbitmq", "--queues", str(topology.queues)],
            cwd=services.REPO, stdout=subprocess.DEVNULL, stderr=(tmp_path / f"consumer-{i}.log").open("w"),
            env={**os.environ, "OUTBOX_DATABASE_URL": database_url, **env},
        ) for i in range(2)
    ]
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        wait_until(lambda: len(_effects(clean_db, topology.topic)) > 50, timeout=60,
                   what="relay and consumers to be at work")
        if fault == "broker restarted":
            services.restart_rabbitmq()
        else:
            close_all_connections(rabbitmq_url)
        time.sleep(3)
        stop_writing.set()
        thread.join()
        wait_until(lambda: _backlog(clean_db) == 0, timeout=120, what="relay to publish everything")
        wait_until(lambda: len({e for e, _ in _effects(clean_db, topology.topic)}) >= len(written),
                   timeout=120, what="consumers to apply everything")
        assert relay.poll() is None and all(c.poll() is None for c in consumers), "all ride out the outage"
    finally:
        stop_writing.set()
        thread.join()
        stop_process(relay)
        for c in consumers:
            stop_process(c)
    applied = _effects(clean_db, topology.topic)
    assert len(applied) == len(set(written))  # nothing applied twice
    assert {e for e, _ in applied} == set(written)  # nothing lost
    assert _in_key_order(applied, 6)
    with clean_db.connect() as conn:
        assert list_dead_letters(conn, group=topology.group) == []  # an outage dead-letters nothing
    logs = "".join((tmp_path / f"consumer-{i}.log").read_text() for i in range(2))
    assert "rabbitmq unavailable, reconnecting" in logs and "rabbitmq available again" in logs


def test_a_wrong_rabbitmq_password_stops_the_consumer_with_one_line_and_no_secret(
    clean_db: Engine, rabbitmq_url: str, topologies: Topologies
) -> None:
    topology = topologies.make(queues=1)
    user = rabbitmq_url.split("://", 1)[1].split(":", 1)[0]
    wrong = rabbitmq_url.replace(rabbitmq_url.split("://", 1)[1].split("@", 1)[0], f"{user}:n0t-it-48")

    def handler(session: Session, event: Event) -> None:
        raise AssertionError("never called")

    consumer = _consumer(clean_db, topology, wrong, handler)
    with pytest.raises(ConfigError) as raised:
        consumer.run_once(200)
    consumer.close()
    assert "n0t-it-48" not in str(raised.value)
    assert str(raised.value).startswith(
        "OUTBOX_RABBITMQ_URL: the broker at amqp://outbox:***@") and "refused the login" in str(raised.value)
