"""The relay's window (relay/window.py) when batches fail while later ones of the same keys are in flight.

Fault test: it SIGKILLs the devstack broker (`OUTBOX_DEVSTACK_KAFKA_PORT` picks
which one), so run it only against a broker of your own.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

import outbox
from outbox.schema import outbox_event
from tests import services
from tests.kafka_helpers import first_occurrences, read_topic, start_relay_process, stop_process, wait_until

pytestmark = pytest.mark.integration

KEYS = 8
BATCH = 25  # every batch holds each key about three times: consecutive batches share keys
WINDOW = 8


def _write(engine: Engine, topic: str, n: int) -> list[uuid.UUID]:
    ids: list[uuid.UUID] = []
    with Session(engine) as session:
        for i in range(n):
            event = outbox.publish(session, topic=topic, key=f"key-{i % KEYS}", type="payment.captured",
                                   data={"n": i})
            ids.append(event.id)
        session.commit()
    return ids


def _backlog(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(outbox_event)).scalar_one()


@pytest.mark.parametrize("publisher", ["kafka-python", "confluent"])
def test_broker_killed_with_a_full_window_keeps_every_key_in_commit_order(
    clean_db: Engine, database_url: str, bootstrap_servers: str, topic: str, tmp_path: Path,
    publisher: str,
) -> None:
    """The broker dies while the window holds WINDOW batches of the same keys.

    The relay gives up on the oldest batch before the producer's own delivery
    timeout (4 s here) would expire it, drops the producer, waits the rest of
    the window out, holds back every later event of a failed key, and sends
    them again from a new producer once the broker is back. What a consumer
    that skips ids it has seen reads is every event once, in commit order per key.
    """
    services.require_devstack("kafka")
    ids = _write(clean_db, topic, 20_000)
    log = tmp_path / "relay.log"
    proc = start_relay_process(database_url, bootstrap_servers, log_path=log, extra_env={
        "OUTBOX_RELAY_PUBLISHER": publisher,
        "OUTBOX_RELAY_BATCH_SIZE": str(BATCH),
        "OUTBOX_RELAY_MAX_IN_FLIGHT": str(WINDOW),
        "OUTBOX_RELAY_BACKOFF_MAX": "1",
        "OUTBOX_KAFKA_DELIVERY_TIMEOUT_MS": "4000",
        "OUTBOX_KAFKA_REQUEST_TIMEOUT_MS": "1500",
    })
    try:
        wait_until(lambda: _backlog(clean_db) < 19_000, timeout=60, what="relay to start publishing")
        services.restart_kafka()  # SIGKILL, start again, wait until it answers
        wait_until(lambda: _backlog(clean_db) == 0, timeout=180, what="backlog to drain")
        assert proc.poll() is None, "the relay must ride out the outage, not exit"
    finally:
        assert stop_process(proc) == 0
    text = log.read_text()
    # The case this test is about happened: a failure with later events of its keys in flight.
    settled = [line for line in text.splitlines() if "window settled after a failure" in line]
    assert settled, text[-3000:]
    assert any(" 0 later event(s)" not in line for line in settled), settled
    received = read_topic(bootstrap_servers, topic, expect=len(ids), timeout=90)
    assert {r.event_id for r in received} == set(ids)  # nothing lost
    expected: dict[str, list[uuid.UUID]] = {}
    for i, event_id in enumerate(ids):
        expected.setdefault(f"key-{i % KEYS}", []).append(event_id)
    assert first_occurrences(received) == expected
