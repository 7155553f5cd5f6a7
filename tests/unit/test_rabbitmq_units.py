"""RabbitMQ's pure parts: the URL setting, the CloudEvents AMQP mapping, the topology's names."""

from __future__ import annotations

import pytest

from outbox.errors import ConfigError
from outbox.rabbitmq_topology import ROUTING_BUCKETS, Topology, routing_bucket
from outbox.rabbitmq_wire import from_amqp, rabbitmq_url, to_amqp
from relay.config import RelayConfig

KAFKA_HEADERS = [
    ("ce_specversion", b"1.0"), ("ce_id", b"5d9b2f0e-0000-4000-8000-000000000001"),
    ("ce_source", b"outbox-relay"), ("ce_type", b"payment.captured"),
    ("ce_time", b"2026-12-01T18:00:00.000000Z"), ("content-type", b"application/json"),
    ("traceparent", b"00-abc-01"),
]


def test_cloudevents_attributes_travel_as_the_amqp_binding_maps_them_and_come_back_the_same() -> None:
    content_type, headers = to_amqp(KAFKA_HEADERS)
    assert content_type == "application/json"
    assert headers == {
        "cloudEvents:specversion": "1.0", "cloudEvents:id": "5d9b2f0e-0000-4000-8000-000000000001",
        "cloudEvents:source": "outbox-relay", "cloudEvents:type": "payment.captured",
        "cloudEvents:time": "2026-12-01T18:00:00.000000Z", "traceparent": "00-abc-01",
    }
    assert sorted(from_amqp(content_type, headers)) == sorted(KAFKA_HEADERS)


def test_another_producers_header_values_are_read_as_text() -> None:
    assert from_amqp(None, {"cloudEvents:specversion": b"1.0", "n": 3}) == [
        ("ce_specversion", b"1.0"), ("n", b"3")]


@pytest.mark.parametrize(("url", "message"), [
    ("", "OUTBOX_RABBITMQ_URL: not set"),
    ("http://u:p@h/v", "OUTBOX_RABBITMQ_URL: scheme 'http' is not amqp:// or amqps://"),
    ("amqp://u:p@h:port/v", "OUTBOX_RABBITMQ_URL: has a port that is not a number"),
])
def test_a_wrong_rabbitmq_url_is_one_line_naming_the_variable(url: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        rabbitmq_url(env={"OUTBOX_RABBITMQ_URL": url})
    assert str(raised.value).startswith(message)
    assert "p@" not in str(raised.value)


def test_the_rabbitmq_relay_needs_no_kafka_address_and_never_shows_the_password() -> None:
    config = RelayConfig.from_env({
        "OUTBOX_DATABASE_URL": "postgresql://x/y", "OUTBOX_RELAY_PUBLISHER": "rabbitmq",
        "OUTBOX_RABBITMQ_URL": "amqp://outbox:r-s3cret-9@127.0.0.1:19672/outbox",
    })
    assert config.rabbitmq_url is not None and config.bootstrap_servers == ""
    for shown in (repr(config), config.describe()):
        assert "r-s3cret-9" not in shown and "rabbitmq=amqp://outbox:***@127.0.0.1:19672/outbox" in shown
    with pytest.raises(ConfigError, match="OUTBOX_RABBITMQ_URL: not set"):
        RelayConfig.from_env({"OUTBOX_DATABASE_URL": "postgresql://x/y", "OUTBOX_RELAY_PUBLISHER": "rabbitmq"})


def test_the_topology_names_one_groups_queues_behind_the_topics_exchange() -> None:
    topology = Topology(topic="payments", group="ledger", queues=3, delivery_limit=7)
    assert topology.exchange == "payments"
    assert topology.group_exchange == "payments.ledger"
    assert topology.queue_names == ["payments.ledger.0", "payments.ledger.1", "payments.ledger.2"]
    assert topology.queue_arguments() == {
        "x-queue-type": "quorum", "x-single-active-consumer": True, "x-delivery-limit": 7,
        "x-dead-letter-exchange": "payments.ledger.dlx",
    }
    with pytest.raises(ConfigError, match="queues: 0 is out of range"):
        Topology(topic="payments", group="ledger", queues=0)
    with pytest.raises(ConfigError, match=r"queues: 65 is out of range 1\.\.64"):
        Topology(topic="payments", group="ledger", queues=65)


def test_a_key_has_one_routing_bucket_forever_and_keys_spread_over_all_of_them() -> None:
    """crc32, not Python's hash(): the same in every process and after every restart."""
    assert routing_bucket(b"pay-1") == routing_bucket(b"pay-1") == "62"
    assert {routing_bucket(f"pay-{i}".encode()) for i in range(2000)} == {
        str(b) for b in range(ROUTING_BUCKETS)}


def test_the_kafka_paths_never_import_pika() -> None:
    """pika is the optional `rabbitmq` extra: a Kafka-only install must never need it."""
    import subprocess
    import sys

    from harness.devstack import REPO

    code = ("import sys, outbox, outbox.consumer, outbox.cli, relay.config, relay.relay, relay.kafka\n"
            "relay.config.RelayConfig(database_url='postgresql://x/y', bootstrap_servers='k:1')\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'pika'))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
