"""The publishers a relay can use, by the name `OUTBOX_RELAY_PUBLISHER` gives.

A transport is one file implementing `relay.publisher.Publisher` and one
line here. Each is imported only when chosen, so an optional client library
(confluent-kafka) is needed only by the relays that use it, and a relay
config can be made and checked without importing any client at all.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, NamedTuple

from outbox.errors import ConfigError

if TYPE_CHECKING:
    from relay.config import RelayConfig
    from relay.publisher import Publisher


class Transport(NamedTuple):
    """Where a publisher class lives ("module:Class"), called as
    `Class(bootstrap_servers, kafka_settings)`, or `Class.from_config(config)`
    where it has that; and, for an optional one, the package and the extra
    that install its client."""

    target: str
    package: str | None = None
    extra: str | None = None


# kafka-python by default (pure Python, nothing to compile); confluent-kafka
# (librdkafka) for relays where kafka-python's own CPU cost is the limit.
PUBLISHERS: dict[str, Transport] = {
    "kafka-python": Transport("relay.kafka:KafkaPublisher"),
    "confluent": Transport("relay.confluent:ConfluentPublisher", "confluent-kafka", "confluent"),
    # Not Kafka: publishes to RabbitMQ (OUTBOX_RABBITMQ_URL), made by its from_config.
    "rabbitmq": Transport("relay.rabbitmq:RabbitMQPublisher", "pika", "rabbitmq"),
}


def make_publisher(config: RelayConfig) -> Publisher:
    """The publisher `config.publisher` names (RelayConfig has checked the name)."""
    transport = PUBLISHERS[config.publisher]
    module_name, _, class_name = transport.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        if transport.package is None:
            raise
        raise ConfigError(
            "OUTBOX_RELAY_PUBLISHER",
            f"{config.publisher} needs the {transport.package} package: "
            f"pip install 'outbox-kit[{transport.extra}]'",
        ) from None
    cls = getattr(module, class_name)
    if hasattr(cls, "from_config"):  # a transport whose settings are not Kafka's
        made: Publisher = cls.from_config(config)
        return made
    publisher: Publisher = cls(config.bootstrap_servers, config.kafka)
    return publisher
