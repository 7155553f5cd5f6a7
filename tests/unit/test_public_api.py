"""The public API is what `outbox.__all__` names: a change to it is a decision, not a side effect."""

from __future__ import annotations

import importlib

import outbox

PUBLIC_API = [
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


def test_outbox_all_is_exactly_the_pinned_public_api() -> None:
    assert sorted(outbox.__all__) == PUBLIC_API
    assert len(outbox.__all__) == len(set(outbox.__all__)), "a name is listed twice"


def test_every_public_name_is_importable_from_outbox() -> None:
    fresh = importlib.import_module("outbox")
    missing = [name for name in PUBLIC_API if not hasattr(fresh, name)]
    assert missing == []
    namespace: dict[str, object] = {}
    exec("from outbox import *", namespace)  # what a star import really yields
    assert sorted(k for k in namespace if k != "__builtins__") == PUBLIC_API
