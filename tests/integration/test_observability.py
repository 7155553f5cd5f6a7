"""Metrics and health, read as Prometheus and Kubernetes read them: real HTTP scrapes of a
relay and a consumer working against the real PostgreSQL and Kafka.

Every metric is checked to move when its cause happens (publish, park,
duplicate, retry, dead letter, outage), as a difference between two scrapes:
the metrics live in the process-wide default registry, which other tests in
this process also write to.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

import outbox
from harness.scrape import Samples, free_port, probe, scrape, value
from outbox.consumer import Consumer
from outbox.event import Event
from relay import RelayConfig
from relay.leases import ShardLeases
from relay.observer import RelayObserver
from tests import services
from tests.integration.test_consumer import FAST_CONFIG, FAST_KAFKA, cloud_event, handled, produce
from tests.kafka_helpers import (
    relay_thread,
    run_relay_until_exit,
    start_relay_process,
    stop_process,
    wait_until,
)

pytestmark = pytest.mark.integration


def _write(engine: Engine, topic: str, n: int) -> list[uuid.UUID]:
    with Session(engine) as session:
        ids = [
            outbox.publish(session, topic=topic, key=f"acct-{i % 3}", type="payment.captured",
                           data={"amount": i}).id
            for i in range(n)
        ]
        session.commit()
    return ids


def _relay_config(database_url: str, bootstrap_servers: str, **kw: object) -> RelayConfig:
    return RelayConfig(
        database_url=database_url, bootstrap_servers=bootstrap_servers, poll_interval=0.2,
        backoff_max=1.0, metrics_port=free_port(), **kw,  # type: ignore[arg-type]
    )


def _url(config: RelayConfig) -> str:
    return f"http://{config.metrics_host}:{config.metrics_port}"


def _moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def _count(samples: Samples, histogram: str, **labels: str) -> float:
    return value(samples, f"{histogram}_count", **labels)


def test_relay_metrics_move_with_publishes_and_parks(
    clean_db: Engine, database_url: str, bootstrap_servers: str, make_topic: object
) -> None:
    assert callable(make_topic)
    topic, missing = make_topic("obs"), f"obs-missing-{uuid.uuid4().hex[:8]}"
    config = _relay_config(database_url, bootstrap_servers, max_attempts=1)
    url = _url(config)
    with relay_thread(config) as relay:
        wait_until(lambda: probe(url, "/readyz")[0] == 200, timeout=30, what="relay ready")
        before = scrape(url)
        _write(clean_db, topic, 25)
        _write(clean_db, missing, 1)  # no such topic: fails once, parked (max_attempts=1)
        wait_until(lambda: relay.published == 25 and relay.parked == 1, timeout=30, what="rounds")
        # The backlog gauges follow within a probe interval (5 s).
        wait_until(lambda: value(scrape(url), "outbox_parked_events") == 1, timeout=15,
                   what="backlog gauges")
        after = scrape(url)
        assert probe(url, "/livez") == (200, {"status": "ok"})

    assert _moved(before, after, "outbox_relay_published_total", topic=topic) == 25
    assert _moved(before, after, "outbox_relay_parked_total", topic=missing) == 1
    assert _moved(before, after, "outbox_relay_publish_failures_total", kind="UnknownTopic") == 1
    assert _count(after, "outbox_relay_commit_to_ack_seconds", topic=topic) - _count(
        before, "outbox_relay_commit_to_ack_seconds", topic=topic) == 25
    assert _count(after, "outbox_relay_batch_duration_seconds") > _count(
        before, "outbox_relay_batch_duration_seconds")
    assert value(after, "outbox_relay_batch_events_sum") - value(before, "outbox_relay_batch_events_sum") >= 26
    assert value(after, "outbox_relay_shards_owned") > 0
    assert value(after, "outbox_relay_ready") == 1
    # The seed's formula, from the database: n = m + parked once drained, Q = n - m.
    assert value(after, "outbox_published_events") == 25
    assert value(after, "outbox_committed_events") == 26
    assert value(after, "outbox_backlog_events") == 1  # the parked one is not published
    assert value(after, "outbox_oldest_unpublished_age_seconds") == 0  # nothing waiting


def test_backlog_age_counts_the_oldest_waiting_event(
    clean_db: Engine, database_url: str, bootstrap_servers: str
) -> None:
    # The observer of a relay whose loop never runs: the event stays, and ages.
    config = _relay_config(database_url, bootstrap_servers)
    _write(clean_db, f"obs-age-{uuid.uuid4().hex[:8]}", 1)
    time.sleep(1.5)
    observer = RelayObserver(config, ShardLeases(database_url, "obs-age", ttl=3))
    observer.start()
    try:
        observer.probe()
        samples = scrape(_url(config))
    finally:
        observer.close()
    assert value(samples, "outbox_backlog_events") == 1
    assert value(samples, "outbox_oldest_unpublished_age_seconds") >= 1.5


@contextmanager
def _consumer_thread(consumer: Consumer) -> Iterator[None]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            consumer.run()
        except BaseException as exc:  # an outage must never end the loop: say so, not time out
            errors.append(exc)

    thread = threading.Thread(target=run, name="consumer", daemon=True)
    thread.start()
    try:
        yield
    finally:
        consumer.stop()
        thread.join(timeout=30)
        assert not thread.is_alive()
        assert not errors, f"the consumer loop ended: {errors[0]!r}"


def test_consumer_metrics_move_with_applies_duplicates_retries_and_dead_letters(
    clean_db: Engine, bootstrap_servers: str, topic: str, group: str
) -> None:
    def handler(session: Session, event: Event) -> None:
        if event.data.get("fail"):
            raise ValueError("this payment can never be applied")

    consumer = Consumer(
        clean_db, group=group, topics=[topic], handler=handler,
        bootstrap_servers=bootstrap_servers, config=FAST_CONFIG, **FAST_KAFKA,
    )
    endpoints = outbox.serve_consumer_endpoints(consumer, port=0)
    url = endpoints.url
    before = scrape(url)
    first_id, first = cloud_event()
    messages = [(0, first), (1, cloud_event(first_id)[1])]  # the same event twice: one duplicate
    messages += [(0, cloud_event()[1]) for _ in range(3)]
    messages += [(2, cloud_event(data={"fail": True})[1])]  # retried, then dead-lettered
    produce(bootstrap_servers, topic, messages)
    try:
        with _consumer_thread(consumer):
            wait_until(lambda: handled(consumer) == 6, timeout=60, what="all six handled")
            wait_until(lambda: probe(url, "/readyz")[0] == 200, timeout=30, what="consumer ready")
            assert probe(url, "/livez") == (200, {"status": "ok"})
            time.sleep(1.5)  # the lag is read at most once a second, before a poll
            after = scrape(url)
    finally:
        endpoints.close()

    def moved(name: str, **labels: str) -> float:
        return _moved(before, after, name, group=group, **labels)

    assert moved("outbox_consumer_applied_total", topic=topic) == 4
    assert moved("outbox_consumer_duplicates_total", topic=topic) == 1
    assert moved("outbox_consumer_dead_lettered_total", topic=topic) == 1
    assert moved("outbox_consumer_handler_retries_total", topic=topic) == FAST_CONFIG.max_attempts - 1
    # Handler calls: four applied, plus max_attempts for the failing one (at least:
    # a batch rolled back by the failure runs its earlier handlers again).
    assert moved("outbox_consumer_handler_duration_seconds_count", topic=topic) >= 4 + FAST_CONFIG.max_attempts
    assert moved("outbox_consumer_commit_to_effect_seconds_count", topic=topic) == 4
    assert moved("outbox_consumer_batch_transaction_seconds_count") >= 1
    assert value(after, "outbox_consumer_ready", group=group) == 1
    assert value(after, "outbox_consumer_heartbeat_timestamp_seconds", group=group) > time.time() - 60
    lags = {labels: v for (name, labels), v in after.items() if name == "outbox_consumer_lag_messages"
            and dict(labels)["group"] == group}
    assert lags and all(v == 0 for v in lags.values()), lags  # all handled: nothing behind


def test_relay_and_consumer_health_follow_a_broker_outage(
    clean_db: Engine, database_url: str, bootstrap_servers: str, topic: str, group: str
) -> None:
    """Broker stopped: /readyz 503 with a one-line reason, /livez 200; started again: 200."""
    services.require_devstack("kafka")
    config = _relay_config(database_url, bootstrap_servers)
    url = _url(config)
    consumer = Consumer(clean_db, group=group, topics=[topic], handler=lambda _s, _e: None,
                        bootstrap_servers=bootstrap_servers, config=FAST_CONFIG, **FAST_KAFKA)
    endpoints = outbox.serve_consumer_endpoints(consumer, port=0)
    urls = (url, endpoints.url)
    with relay_thread(config) as relay, _consumer_thread(consumer):
        for u in urls:
            wait_until(lambda u=u: probe(u, "/readyz")[0] == 200, timeout=30, what=f"{u} ready")
        before = scrape(url)
        services.stop_kafka()
        try:
            _write(clean_db, topic, 3)  # a round that fails: the loop's own outage
            for u in urls:
                wait_until(lambda u=u: probe(u, "/readyz")[0] == 503, timeout=120, what=f"{u}/readyz 503")
                _, body = probe(u, "/readyz")
                assert body["status"] == "unavailable" and "broker" in body["reason"], body
                assert "\n" not in body["reason"]
            wait_until(lambda: value(scrape(url), "outbox_relay_outage", kind="broker") == 1,
                       timeout=60, what="the loop to notice the outage")
            time.sleep(3)
            for u in urls:  # an outage is not death
                assert probe(u, "/livez") == (200, {"status": "ok"})
        finally:
            services.start_kafka()
        for u in urls:
            wait_until(lambda u=u: probe(u, "/readyz")[0] == 200, timeout=120, what=f"{u}/readyz 200 again")
        # Bounds, not figures: a KRaft broker restart plus a group rejoin took over 60 s under CI load.
        wait_until(lambda: relay.published >= 3, timeout=180, what="the backlog to drain")
        wait_until(lambda: handled(consumer) == 3, timeout=180, what="the consumer to apply them")
        after = scrape(url)
    endpoints.close()
    assert _moved(before, after, "outbox_relay_outages_total", kind="broker") >= 1
    assert _moved(before, after, "outbox_relay_outage_seconds_total", kind="broker") > 0
    assert value(after, "outbox_relay_outage", kind="broker") == 0
    assert _moved(before, after, "outbox_relay_published_total", topic=topic) == 3


def test_relay_daemon_serves_metrics_from_the_env_and_logs_json_lines(
    clean_db: Engine, database_url: str, bootstrap_servers: str, tmp_path: Path
) -> None:
    """`outbox relay` with OUTBOX_RELAY_METRICS_PORT and OUTBOX_LOG_FORMAT=json, as a real process."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "relay.log"
    missing = f"obs-missing-{uuid.uuid4().hex[:8]}"
    proc = start_relay_process(database_url, bootstrap_servers, log_path=log, extra_env={
        "OUTBOX_RELAY_METRICS_PORT": str(port), "OUTBOX_LOG_FORMAT": "json",
        "OUTBOX_RELAY_MAX_ATTEMPTS": "1",
    })
    try:
        wait_until(lambda: probe(url, "/readyz")[0] == 200, timeout=30, what="relay ready")
        [event_id] = _write(clean_db, missing, 1)
        wait_until(lambda: value(scrape(url), "outbox_relay_parked_total", topic=missing) == 1,
                   timeout=30, what="the event parked")
    finally:
        assert stop_process(proc) == 0
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    assert lines and all({"time", "level", "logger", "message", "relay_id"} <= set(line) for line in lines)
    parked = [line for line in lines if line["message"].startswith("event parked")]
    assert parked and parked[0]["event_id"] == str(event_id) and parked[0]["topic"] == missing


def test_a_metrics_port_in_use_exits_at_start_with_one_line_naming_the_setting(
    clean_db: Engine, database_url: str, bootstrap_servers: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        exited = run_relay_until_exit(database_url, bootstrap_servers, timeout=30,
                                      extra_env={"OUTBOX_RELAY_METRICS_PORT": str(port)})
    assert exited.returncode == 2, exited.output
    [line] = [x for x in exited.output.splitlines() if x.startswith("outbox relay:")]
    assert "OUTBOX_RELAY_METRICS_PORT" in line and f"127.0.0.1:{port}" in line, line
