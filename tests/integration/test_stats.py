"""`outbox stats`: the on-call view, read from a real outbox, a real relay and a real Kafka group."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest
from kafka import KafkaConsumer
from kafka.structs import OffsetAndMetadata, TopicPartition
from sqlalchemy import Engine
from sqlalchemy.orm import Session

import outbox
from tests.integration.test_consumer import cloud_event, produce
from tests.integration.test_migrations import outbox_cli
from tests.integration.test_relay import _config
from tests.kafka_helpers import relay_thread, wait_until

pytestmark = pytest.mark.integration


def _write(engine: Engine, topic: str, n: int) -> None:
    with Session(engine) as session:
        for i in range(n):
            outbox.publish(session, topic=topic, key=f"k{i % 4}", type="payment.captured", data={"n": i})
        session.commit()


def _stats(database_url: str, *args: str) -> dict[str, Any]:
    result = outbox_cli(database_url, "stats", "--json", *args)
    assert result.returncode == 0, result.stderr
    view: dict[str, Any] = json.loads(result.stdout)
    return view


def test_stats_json_breaks_the_backlog_down_by_topic_and_says_stalled(
    clean_db: Engine, database_url: str
) -> None:
    a, b = f"st-a-{uuid.uuid4().hex[:6]}", f"st-b-{uuid.uuid4().hex[:6]}"
    _write(clean_db, a, 3)
    _write(clean_db, b, 2)
    view = _stats(database_url)
    assert (view["committed"], view["published"], view["backlog"], view["waiting"]) == (5, 0, 5, 5)
    assert [(t["topic"], t["waiting"], t["parked"]) for t in view["topics"]] == [(a, 3, 0), (b, 2, 0)]
    assert all(t["oldest_unpublished_age_seconds"] >= 0 for t in view["topics"])
    # No relay runs: events wait and nothing was published in the last minute.
    assert view["published_last_minute"] == 0
    assert view["stalled"] is True and view["drain_seconds"] is None
    text = outbox_cli(database_url, "stats").stdout
    assert "stalled" in text and a in text and b in text


def test_stats_measures_the_publish_rate_from_the_relays_counters(
    clean_db: Engine, database_url: str, bootstrap_servers: str, topic: str
) -> None:
    with relay_thread(_config(database_url, bootstrap_servers)) as relay:
        _write(clean_db, topic, 40)
        wait_until(lambda: relay.published == 40, timeout=30, what="40 published")
    # The bucket still filling is left out of the minute: wait for it to close.
    time.sleep(10.5)
    view = _stats(database_url)
    assert view["published"] == 40 and view["backlog"] == 0
    assert view["published_last_minute"] == 40
    assert view["publish_rate_per_second"] == pytest.approx(40 / 60, abs=0.001)
    assert view["drain_seconds"] == 0 and view["stalled"] is False
    # T = Q x P: with 20 waiting and 40/min published, 30 s.
    _write(clean_db, f"st-wait-{uuid.uuid4().hex[:6]}", 20)
    view = _stats(database_url)
    assert view["waiting"] == 20
    assert view["drain_seconds"] == pytest.approx(30, abs=0.1)


def test_stats_shows_consumer_lag_per_group(
    clean_db: Engine, database_url: str, bootstrap_servers: str, topic: str, group: str
) -> None:
    produce(bootstrap_servers, topic, [(0, cloud_event()[1]) for _ in range(5)]
            + [(1, cloud_event()[1]) for _ in range(2)])
    client = KafkaConsumer(bootstrap_servers=bootstrap_servers, group_id=group, enable_auto_commit=False)
    try:  # the group applied 2 of partition 0's 5 messages and none of partition 1's
        client.commit({TopicPartition(topic, 0): OffsetAndMetadata(2, "", -1),
                       TopicPartition(topic, 1): OffsetAndMetadata(0, "", -1)})
    finally:
        client.close()
    view = _stats(database_url, "--bootstrap-servers", bootstrap_servers, "--group", group)
    assert view["consumer_lag_error"] is None
    [lag] = view["consumer_lag"]
    assert lag["group"] == group and lag["lag"] == 5 and lag["topics"] == {topic: 5}
    assert {(p["partition"], p["lag"]) for p in lag["partitions"]} == {(0, 3), (1, 2)}
    text = outbox_cli(database_url, "stats", "--bootstrap-servers", bootstrap_servers,
                      "--group", group).stdout
    assert f"{topic}=5" in text
