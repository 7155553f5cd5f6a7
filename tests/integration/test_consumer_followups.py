"""A handler that publishes follow-up events: each exists exactly once iff its effect committed.

The core payments pattern (a ledger posts a payment and announces the
posting): the handler writes its effect and calls `outbox.publish(session,
...)` with the session the consumer gave it, so the follow-up's outbox row
joins the consumer's transaction with the effect and the inbox row. Against
the real PostgreSQL and Kafka, with the consumer SIGKILLed at random.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from harness.devstack import REPO
from outbox.event import Event
from outbox.failpoints import FAILPOINT_ENV
from tests.followup_proc import EFFECT_TABLE_DDL, FOLLOWUP_TYPE, post_and_announce
from tests.integration.test_consumer import cloud_event, consumer_for, drain, produce

pytestmark = pytest.mark.integration

EVENTS = 200


@pytest.fixture(scope="module")
def effects(engine: Engine) -> Engine:
    with engine.begin() as conn:
        conn.execute(text(EFFECT_TABLE_DDL))
    return engine


def effect_counts(engine: Engine, topic: str) -> Counter[uuid.UUID]:
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT event_id FROM test_followup_effect WHERE topic = :t"), {"t": topic}
        ).scalars()
        return Counter(rows)


def followup_counts(engine: Engine, followup_topic: str) -> Counter[uuid.UUID]:
    """Follow-ups by the input event they announce (no relay runs: they stay in outbox_event)."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT convert_from(payload, 'UTF8')::jsonb ->> 'source_event' FROM outbox_event"
                " WHERE topic = :t AND type = :type"
            ),
            {"t": followup_topic, "type": FOLLOWUP_TYPE},
        ).scalars()
        return Counter(uuid.UUID(row) for row in rows)


def assert_each_followup_once_iff_its_effect(
    engine: Engine, topic: str, followup_topic: str, when: str
) -> int:
    effects_seen = effect_counts(engine, topic)
    followups = followup_counts(engine, followup_topic)
    doubled = {e: n for e, n in effects_seen.items() if n != 1}
    assert not doubled, f"{when}: effects applied twice: {doubled}"
    doubled = {e: n for e, n in followups.items() if n != 1}
    assert not doubled, f"{when}: follow-ups published twice: {doubled}"
    assert set(followups) == set(effects_seen), (
        f"{when}: follow-ups without their effect: {set(followups) - set(effects_seen)}; "
        f"effects without their follow-up: {set(effects_seen) - set(followups)}"
    )
    return len(effects_seen)


def followup_process(
    group: str, topic: str, followup_topic: str, database_url: str, bootstrap_servers: str,
    *, transaction_batch_size: int, failpoint: str | None = None,
) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env.update(OUTBOX_DATABASE_URL=database_url, OUTBOX_KAFKA_BOOTSTRAP_SERVERS=bootstrap_servers)
    if failpoint:
        env[FAILPOINT_ENV] = failpoint
    return subprocess.Popen(
        [sys.executable, "-m", "tests.followup_proc", "--group", group, "--topic", topic,
         "--followup-topic", followup_topic, "--expect", str(EVENTS),
         "--transaction-batch-size", str(transaction_batch_size)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_followups_published_by_a_sigkilled_consumer_exist_once_iff_their_effect_committed(
    effects: Engine, database_url: str, bootstrap_servers: str, topic: str, group: str
) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    followup_topic = f"{topic}-postings"
    events = [cloud_event(key=f"acct-{i % 7}") for i in range(EVENTS)]
    produce(bootstrap_servers, topic, [(i % 4, message) for i, (_, message) in enumerate(events)])

    kills: list[str] = []
    progress: list[int] = []
    for run in range(6):
        batch = rng.choice([1, 7, 50])
        if run % 2 == 0:
            # Dies right after the k-th transaction committed, before its offsets.
            k = rng.randint(1, 3 if batch == 50 else 30)  # never all 200 at once
            proc = followup_process(group, topic, followup_topic, database_url,
                                    bootstrap_servers, transaction_batch_size=batch,
                                    failpoint=f"consumer-after-db-commit:{k}")
            how = f"failpoint after commit {k} (batch {batch})"
            try:
                proc.communicate(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                raise
        else:
            # Dies anywhere while it works: mid-transaction, between commit and offsets.
            before = len(effect_counts(effects, topic))
            proc = followup_process(group, topic, followup_topic, database_url,
                                    bootstrap_servers, transaction_batch_size=batch)
            delay = rng.uniform(0.0, 0.5)
            how = f"SIGKILL {delay:.2f}s into its work (batch {batch})"
            deadline = time.monotonic() + 60
            while (proc.poll() is None and len(effect_counts(effects, topic)) == before
                   and time.monotonic() < deadline):
                time.sleep(0.02)
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
        if proc.returncode != -signal.SIGKILL:
            # It finished before the kill came: everything is applied.
            assert proc.returncode == 0, f"seed {seed}, {how}: exit {proc.returncode}"
            break
        kills.append(how)
        progress.append(assert_each_followup_once_iff_its_effect(
            effects, topic, followup_topic, f"seed {seed}, after {how}"
        ))

    final = followup_process(group, topic, followup_topic, database_url, bootstrap_servers,
                             transaction_batch_size=rng.choice([1, 7, 50]))
    out, err = final.communicate(timeout=120)
    assert final.returncode == 0, f"seed {seed}: {err[-2000:]}"
    stats = json.loads(out.strip().splitlines()[-1])
    print(f"seed {seed}: kills {kills}, effects after each {progress}, final run {stats}")

    applied = assert_each_followup_once_iff_its_effect(
        effects, topic, followup_topic, f"seed {seed}, at the end"
    )
    assert applied == EVENTS
    assert set(effect_counts(effects, topic)) == {event_id for event_id, _ in events}
    # The kills happened with work half done, so the restarts met committed events again.
    assert kills, f"seed {seed}: no run was killed"
    assert any(0 < n < EVENTS for n in progress), f"seed {seed}: kills {kills}, progress {progress}"
    assert stats["applied"] < EVENTS  # the final run found work already committed


def test_followups_of_a_batch_rolled_back_by_a_failing_neighbour_are_published_once(
    effects: Engine, bootstrap_servers: str, topic: str, group: str
) -> None:
    followup_topic = f"{topic}-postings"
    events = [cloud_event(key="acct-1") for _ in range(5)]
    produce(bootstrap_servers, topic, [(0, message) for _, message in events])
    failed: list[uuid.UUID] = []

    def flaky_middle(session: Session, event: Event) -> None:
        post_and_announce(session, event, followup_topic=followup_topic)
        if event.id == events[2][0] and not failed:
            failed.append(event.id)  # after its own follow-up: the rollback must take both
            raise RuntimeError("ledger briefly unavailable")

    with consumer_for(effects, bootstrap_servers, group, topic, flaky_middle) as consumer:
        drain(consumer, lambda: consumer.stats.applied == 5)

    assert failed == [events[2][0]]
    assert assert_each_followup_once_iff_its_effect(effects, topic, followup_topic, "drained") == 5
