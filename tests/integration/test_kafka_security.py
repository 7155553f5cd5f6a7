"""The kit against a broker that demands TLS and SCRAM and enforces ACLs.

The devstack broker's SASL_SSL listener (`devstack/devstack env` prints it as
OUTBOX_DEVSTACK_KAFKA_SSL_*): a certificate from the devstack's own CA,
SCRAM-SHA-512 users, and ACLs under which the relay's user may only write
(and describe) the topics named `secure.*`, the consumer's user may only read
them and use the groups named `secure.*`. Every process here is configured only
through the documented OUTBOX_KAFKA_* variables, with both publishers.

What each refusal is, and why:
- a wrong password or an untrusted CA stops the relay at start (exit 2, one
  line naming the variable): a setting, which no waiting fixes; the consumer
  raises the same one-line ConfigError from its first poll;
- a topic the relay's user may not write is that topic's events' own failure:
  counted, parked after OUTBOX_RELAY_MAX_ATTEMPTS with an error naming the
  ACL and the variable, while the events of every allowed topic go on (ACLs
  are per topic; one missing grant must not stop the payments of the others);
- a topic or group the consumer's user may not read raises a ConfigError
  from `run_once`, naming the user and the topic or group.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAuthorizationFailedError
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

import outbox
from harness import devstack
from outbox.errors import ConfigError
from outbox.parked import list_parked
from outbox.schema import outbox_event
from tests import services
from tests.integration.conftest import _wait_for_leaders
from tests.kafka_helpers import run_relay_until_exit, start_relay_process, stop_process, wait_until

pytestmark = pytest.mark.integration

SSL = devstack.ssl_listener()
PUBLISHERS = ["kafka-python", "confluent"]


def kafka_env(username: str, password: str, *, cafile: str = SSL.cafile) -> dict[str, str]:
    """The documented OUTBOX_KAFKA_* settings for the SASL_SSL listener."""
    return {
        "OUTBOX_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "OUTBOX_KAFKA_SASL_MECHANISM": SSL.mechanism,
        "OUTBOX_KAFKA_SASL_PLAIN_USERNAME": username,
        "OUTBOX_KAFKA_SASL_PLAIN_PASSWORD": password,
        "OUTBOX_KAFKA_SSL_CAFILE": cafile,
    }


def relay_env(publisher: str, **kafka: str) -> dict[str, str]:
    return {"OUTBOX_RELAY_PUBLISHER": publisher,
            **kafka_env(kafka.get("username", SSL.relay_username),
                        kafka.get("password", SSL.relay_password),
                        cafile=kafka.get("cafile", SSL.cafile))}


def _write(engine: Engine, topic: str, n: int) -> set[uuid.UUID]:
    with Session(engine) as session:
        ids = {outbox.publish(session, topic=topic, key=f"k-{i % 3}", type="t", data={"n": i}).id
               for i in range(n)}
        session.commit()
    return ids


def _backlog(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(outbox_event)).scalar_one())


def _refusal(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("outbox relay: ")]
    assert len(lines) == 1, output[-3000:]
    return lines[0]


@pytest.fixture
def secure_topic(make_topic: Callable[..., str]) -> str:
    return make_topic(SSL.topic_prefix + "pay")


@pytest.fixture
def consumer_as(
    monkeypatch: pytest.MonkeyPatch, engine: Engine
) -> Iterator[Callable[..., outbox.Consumer]]:
    """An `outbox.Consumer` on the SASL_SSL listener, configured by OUTBOX_KAFKA_* only."""
    made: list[outbox.Consumer] = []

    def make(topic: str, handler: Callable[..., None], *, group: str | None = None,
             username: str = SSL.consumer_username, password: str = SSL.consumer_password,
             cafile: str = SSL.cafile, servers: str = SSL.servers) -> outbox.Consumer:
        for name, value in {**kafka_env(username, password, cafile=cafile),
                            "OUTBOX_KAFKA_BOOTSTRAP_TIMEOUT_MS": "5000"}.items():
            monkeypatch.setenv(name, value)
        consumer = outbox.Consumer(
            engine, group=group or f"{SSL.group_prefix}ledger-{uuid.uuid4().hex[:8]}",
            topics=[topic], handler=handler, bootstrap_servers=servers,
        )
        made.append(consumer)
        return consumer

    yield make
    for consumer in made:
        consumer.close()


@pytest.mark.parametrize("publisher", PUBLISHERS)
def test_events_go_through_sasl_ssl_from_the_relay_to_a_consumer(
    clean_db: Engine, database_url: str, secure_topic: str, consumer_as: Callable[..., outbox.Consumer],
    publisher: str, tmp_path: object,
) -> None:
    ids = _write(clean_db, secure_topic, 20)
    log = tmp_path / "relay.log"  # type: ignore[operator]
    relay = start_relay_process(database_url, SSL.servers, extra_env=relay_env(publisher), log_path=log)
    try:
        wait_until(lambda: _backlog(clean_db) == 0, timeout=60, what="the relay to drain the outbox")
    finally:
        assert stop_process(relay) == 0
    seen: set[uuid.UUID] = set()
    consumer = consumer_as(secure_topic, lambda session, event: seen.add(event.id))
    wait_until(lambda: consumer.run_once(500) >= 0 and seen >= ids, timeout=60, what="all 20 consumed")
    assert seen == ids
    assert SSL.relay_password not in log.read_text()


@pytest.fixture(scope="module")
def cluster_admin() -> Iterator[KafkaAdminClient]:
    """The 3-broker cluster (its PLAINTEXT listener, for topic admin only), stopped after."""
    admin = KafkaAdminClient(bootstrap_servers=services.cluster_bootstrap_servers())
    yield admin
    admin.close()
    services.stop_cluster()


@pytest.mark.parametrize("publisher", PUBLISHERS)
def test_events_go_through_sasl_ssl_on_the_three_broker_cluster_with_replication_factor_3(
    clean_db: Engine, database_url: str, cluster_admin: KafkaAdminClient,
    consumer_as: Callable[..., outbox.Consumer], publisher: str, tmp_path: object,
) -> None:
    # Every broker's SASL_SSL listener has its own certificate from the devstack CA;
    # the relay and the consumer learn the other brokers from metadata, so a
    # hostname check or a listener missing on one broker fails here, not in production.
    topic = f"{SSL.topic_prefix}cluster-{uuid.uuid4().hex[:8]}"
    cluster_admin.create_topics([NewTopic(topic, 6, 3, topic_configs={"min.insync.replicas": "2"})])
    _wait_for_leaders(cluster_admin, topic, 6)
    try:
        ids = _write(clean_db, topic, 60)
        log = tmp_path / "relay.log"  # type: ignore[operator]
        relay = start_relay_process(database_url, SSL.cluster_servers,
                                    extra_env=relay_env(publisher), log_path=log)
        try:
            wait_until(lambda: _backlog(clean_db) == 0, timeout=90, what="the relay to drain the outbox")
        finally:
            assert stop_process(relay) == 0
        seen: list[uuid.UUID] = []
        consumer = consumer_as(topic, lambda session, event: seen.append(event.id),
                               servers=SSL.cluster_servers)
        wait_until(lambda: consumer.run_once(500) >= 0 and set(seen) >= ids, timeout=90,
                   what="all 60 consumed from the cluster")
        assert sorted(seen) == sorted(ids)  # each once
        assert SSL.relay_password not in log.read_text()
    finally:
        cluster_admin.delete_topics([topic])


@pytest.mark.parametrize("publisher", PUBLISHERS)
def test_a_wrong_scram_password_stops_the_relay_at_start_naming_the_setting(
    database_url: str, publisher: str
) -> None:
    wrong = f"wrong-{uuid.uuid4().hex[:8]}"
    exited = run_relay_until_exit(database_url, SSL.servers, extra_env=relay_env(publisher, password=wrong))
    assert exited.returncode == 2, exited.output[-3000:]
    line = _refusal(exited.output)
    assert "OUTBOX_KAFKA_SASL_PLAIN_PASSWORD" in line and "refused the SASL login" in line, line
    assert wrong not in exited.output and SSL.relay_password not in exited.output


@pytest.mark.parametrize("publisher", PUBLISHERS)
def test_an_untrusted_ca_stops_the_relay_at_start_naming_the_setting(
    database_url: str, publisher: str
) -> None:
    exited = run_relay_until_exit(
        database_url, SSL.servers, extra_env=relay_env(publisher, cafile=SSL.untrusted_cafile))
    assert exited.returncode == 2, exited.output[-3000:]
    line = _refusal(exited.output)
    assert "OUTBOX_KAFKA_SSL_CAFILE" in line and "TLS handshake" in line, line
    assert SSL.relay_password not in exited.output


@pytest.mark.parametrize("publisher", PUBLISHERS)
def test_a_topic_the_relays_user_may_not_write_parks_its_events_and_the_rest_go_on(
    clean_db: Engine, database_url: str, make_topic: Callable[..., str], secure_topic: str,
    publisher: str,
) -> None:
    denied = make_topic("denied")  # outside secure.*: no ACL lets the relay's user write it
    refused = _write(clean_db, denied, 3)
    allowed = _write(clean_db, secure_topic, 5)
    relay = start_relay_process(database_url, SSL.servers, extra_env={
        **relay_env(publisher), "OUTBOX_RELAY_MAX_ATTEMPTS": "2"})
    try:
        wait_until(lambda: _backlog(clean_db) == 0, timeout=90, what="published or parked")
        assert relay.poll() is None, "a missing ACL must not stop the relay"
    finally:
        assert stop_process(relay) == 0
    with clean_db.connect() as conn:
        parked = list_parked(conn)
    assert {p.id for p in parked} == refused
    for event in parked:
        assert "ACLs do not allow" in event.error and denied in event.error, event.error
        assert "OUTBOX_KAFKA_SASL_PLAIN_USERNAME" in event.error and "\n" not in event.error
    assert allowed.isdisjoint(p.id for p in parked)


def test_a_wrong_scram_password_is_one_config_error_from_the_consumer(
    secure_topic: str, consumer_as: Callable[..., outbox.Consumer]
) -> None:
    wrong = f"wrong-{uuid.uuid4().hex[:8]}"
    consumer = consumer_as(secure_topic, lambda s, e: None, password=wrong)
    with pytest.raises(ConfigError) as refused:
        consumer.run_once(500)
    text = str(refused.value)
    assert text.startswith("OUTBOX_KAFKA_SASL_PLAIN_PASSWORD: the broker refused the SASL login"), text
    assert "\n" not in text and wrong not in text


def test_an_untrusted_ca_is_one_config_error_from_the_consumer(
    secure_topic: str, consumer_as: Callable[..., outbox.Consumer]
) -> None:
    consumer = consumer_as(secure_topic, lambda s, e: None, cafile=SSL.untrusted_cafile)
    with pytest.raises(ConfigError) as refused:
        consumer.run_once(500)
    assert str(refused.value).startswith("OUTBOX_KAFKA_SSL_CAFILE: the TLS handshake"), refused.value


def test_a_topic_or_group_the_consumers_user_may_not_read_is_one_config_error(
    make_topic: Callable[..., str], secure_topic: str, consumer_as: Callable[..., outbox.Consumer]
) -> None:
    denied = make_topic("denied")
    with pytest.raises(ConfigError) as refused:
        consumer = consumer_as(denied, lambda s, e: None)
        wait_until(lambda: consumer.run_once(500) < 0, timeout=30, what="the topic refusal")
    assert "read topic " + denied in str(refused.value), refused.value
    assert str(refused.value).startswith("OUTBOX_KAFKA_SASL_PLAIN_USERNAME:"), refused.value
    with pytest.raises(ConfigError) as refused:
        consumer = consumer_as(secure_topic, lambda s, e: None, group=f"ledger-{uuid.uuid4().hex[:8]}")
        wait_until(lambda: consumer.run_once(500) < 0, timeout=30, what="the group refusal")
    assert "read group ledger-" in str(refused.value), refused.value


def test_each_user_is_refused_the_other_ones_side(
    secure_topic: str, consumer_as: Callable[..., outbox.Consumer]
) -> None:
    """Least privilege on the broker: the consumer's user cannot write, the relay's cannot read."""
    producer = KafkaProducer(
        bootstrap_servers=SSL.servers, security_protocol="SASL_SSL", sasl_mechanism=SSL.mechanism,
        sasl_plain_username=SSL.consumer_username, sasl_plain_password=SSL.consumer_password,
        ssl_cafile=SSL.cafile,
        # Not idempotent: that needs a WRITE grant somewhere, and the point is the topic's ACL.
        enable_idempotence=False, acks=1,
    )
    try:
        with pytest.raises(TopicAuthorizationFailedError):
            producer.send(secure_topic, b"forged").get(timeout=20)
    finally:
        producer.close(timeout=5)
    with pytest.raises(ConfigError) as refused:
        consumer = consumer_as(secure_topic, lambda s, e: None, username=SSL.relay_username,
                               password=SSL.relay_password)
        wait_until(lambda: consumer.run_once(500) < 0, timeout=30, what="the relay user's refusal")
    assert f"user {SSL.relay_username!r} to read" in str(refused.value), refused.value
