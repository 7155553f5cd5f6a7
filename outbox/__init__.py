"""The transactional outbox for payment services.

Write path: `publish(session, topic=..., key=..., type=..., data=...)` adds an
event to your database transaction. The relay (`outbox relay`) publishes
committed events to Kafka; `Consumer` applies them exactly once on the other
side. See the README for the guarantees and how each is tested.
"""

from outbox.consumer import Consumer, ConsumerConfig, ConsumerStats
from outbox.errors import (
    ConfigError,
    InvalidEventError,
    MalformedMessageError,
    OutboxError,
    ParkedEventError,
    PayloadTooLargeError,
    PublishError,
    SchemaError,
)
from outbox.event import Event
from outbox.writer import publish, publish_async

__all__ = [
    "ConfigError",
    "Consumer",
    "ConsumerConfig",
    "ConsumerStats",
    "Event",
    "InvalidEventError",
    "MalformedMessageError",
    "OutboxError",
    "ParkedEventError",
    "PayloadTooLargeError",
    "PublishError",
    "SchemaError",
    "publish",
    "publish_async",
]
