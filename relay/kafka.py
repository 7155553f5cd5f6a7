"""The Kafka publisher: kafka-python's idempotent producer, checked before use.

The settings that the guarantees depend on are fixed here and verified
against what the caller passes: `acks=all` (no loss when a broker dies after
acknowledging), `enable_idempotence=True` (producer retries never duplicate),
`max_in_flight_requests_per_connection <= 5` (the idempotent producer keeps
per-partition order up to 5). Anything that would weaken them is refused
with a `ConfigError`, never silently adjusted.

After any failed delivery the producer is thrown away and a new one is made
on the next batch: its successor gets a new producer id, so no sequence
number state from a failed batch can reorder or stall later ones.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from kafka import KafkaProducer
from kafka import errors as kafka_errors

from outbox.config import safe_kafka_config
from outbox.errors import ConfigError
from relay.publisher import (
    ACKNOWLEDGED,
    Delivery,
    Message,
    every_outcome,
    flush_timeout,
    require_safe_delivery,
    send_in_key_order,
)

log = logging.getLogger(__name__)

# Defaults the relay uses unless told otherwise; each can be overridden
# through OUTBOX_KAFKA_<NAME> as long as it stays safe (see REFUSED).
DEFAULTS: dict[str, Any] = {
    "acks": "all",
    "enable_idempotence": True,
    "max_in_flight_requests_per_connection": 5,
    "linger_ms": 5,  # lets one relay batch fill producer batches
    "batch_size": 256 * 1024,
    "delivery_timeout_ms": 30_000,  # a batch fails (and is retried by the relay) after 30 s
    "request_timeout_ms": 10_000,
    "max_block_ms": 10_000,  # how long send() may wait for metadata of a topic
    "retry_backoff_ms": 100,
    "reconnect_backoff_max_ms": 5_000,
    "client_id": "outbox-relay",
}

# Errors that are about the message, not about the broker's health.
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    kafka_errors.MessageSizeTooLargeError,
    kafka_errors.InvalidTopicError,
    kafka_errors.TopicAuthorizationFailedError,
    kafka_errors.RecordListTooLargeError,
)


def producer_config(bootstrap_servers: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The producer settings: defaults, then overrides, refused if unsafe.

    Overrides that are not producer settings (OUTBOX_KAFKA_* is shared with the
    consumer, e.g. OUTBOX_KAFKA_SESSION_TIMEOUT_MS) are left out.
    """
    known = {k: v for k, v in overrides.items() if k in KafkaProducer.DEFAULT_CONFIG}
    config = {**DEFAULTS, **known, "bootstrap_servers": bootstrap_servers.split(",")}
    require_safe_delivery(
        acks=config["acks"], idempotence=config["enable_idempotence"],
        in_flight=config["max_in_flight_requests_per_connection"], retries=config.get("retries", 1),
    )
    config["acks"] = "all"
    for refused in ("transactional_id", "partitioner", "key_serializer", "value_serializer"):
        if refused in overrides:
            raise ConfigError(
                f"OUTBOX_KAFKA_{refused.upper()}",
                "is set by the relay itself (it decides keys, partitions and bytes)",
            )
    return config


class KafkaPublisher:
    """`relay.publisher.Publisher` over kafka-python's `KafkaProducer`."""

    def __init__(self, bootstrap_servers: str, overrides: Mapping[str, Any] | None = None) -> None:
        self._config = producer_config(bootstrap_servers, overrides or {})
        self._producer: KafkaProducer | None = None
        self._flush_timeout = flush_timeout(self._config["delivery_timeout_ms"])
        log.info("kafka publisher settings: %s", safe_kafka_config(self._config))

    def publish(self, messages: Sequence[Message]) -> list[Delivery]:
        producer = self._connect()
        futures: list[Any] = [None] * len(messages)
        send = producer.send

        def send_one(index: int, message: Message) -> None:
            futures[index] = send(
                message.topic, key=message.key, value=message.value, headers=message.headers
            )

        # send() raises before the message enters the producer for a message
        # too large, a bad topic, or no metadata for the topic within max_block_ms.
        results = send_in_key_order(messages, send_one, _failed)
        try:
            producer.flush(timeout=self._flush_timeout)
        except kafka_errors.KafkaTimeoutError:
            log.warning("no outcome for %d event(s) after %.0f s; dropping the producer",
                        sum(f is not None and not f.is_done for f in futures), self._flush_timeout)
        for index, future in enumerate(futures):
            if future is None:
                continue
            if not future.is_done:
                results[index] = Delivery(False, "no acknowledgement within the flush timeout")
            else:
                results[index] = ACKNOWLEDGED if future.succeeded() else _failed(future.exception)
        deliveries = every_outcome(results, Delivery(False, "no outcome"))
        if not all(d.acknowledged for d in deliveries):
            self.close()
        return deliveries

    def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.close(timeout=5)
            except Exception:  # closing a broken producer must not hide the real error
                log.debug("error while closing the Kafka producer", exc_info=True)

    def _connect(self) -> KafkaProducer:
        if self._producer is None:
            self._producer = KafkaProducer(**self._config)
        return self._producer


def _failed(exc: BaseException | None) -> Delivery:
    if exc is None:
        return Delivery(False, "unknown delivery failure")
    retriable = not isinstance(exc, (*PERMANENT_ERRORS, ValueError, TypeError))
    return Delivery(False, f"{type(exc).__name__}: {exc}", retriable=retriable)
