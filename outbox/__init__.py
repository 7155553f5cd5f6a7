"""The transactional outbox for payment services.

Write path: `publish(session, topic=..., key=..., type=..., data=...)` adds an
event to your database transaction. The relay (`outbox relay`) publishes
committed events to Kafka; `Consumer` applies them exactly once on the other
side. See the README for the guarantees and how each is tested.

The consuming side (`Consumer`, `ConsumerConfig`, `ConsumerStats`) is loaded
on first use: a service that only publishes never imports kafka-python.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from outbox.errors import (
    ConfigError,
    HandlerContractError,
    InvalidEventError,
    MalformedMessageError,
    OutboxError,
    ParkedEventError,
    PayloadTooLargeError,
    PublishError,
    SchemaError,
    TransactionEndedError,
)
from outbox.event import Event
from outbox.writer import publish, publish_async

if TYPE_CHECKING:  # what mypy and IDEs see; at run time __getattr__ below imports them
    from outbox.consumer import Consumer
    from outbox.consumer_config import ConsumerConfig, ConsumerStats
    from outbox.consumer_observer import serve_consumer_endpoints

__all__ = [
    "ConfigError",
    "Consumer",
    "ConsumerConfig",
    "ConsumerStats",
    "Event",
    "HandlerContractError",
    "InvalidEventError",
    "MalformedMessageError",
    "OutboxError",
    "ParkedEventError",
    "PayloadTooLargeError",
    "PublishError",
    "SchemaError",
    "TransactionEndedError",
    "publish",
    "publish_async",
    "serve_consumer_endpoints",
]

# name -> the module that defines it, imported on first access (PEP 562).
_LAZY = {
    "Consumer": "outbox.consumer",
    "ConsumerConfig": "outbox.consumer_config",
    "ConsumerStats": "outbox.consumer_config",
    "serve_consumer_endpoints": "outbox.consumer_observer",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'outbox' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next access is a plain lookup
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
