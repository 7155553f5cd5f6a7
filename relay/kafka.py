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
import time
from collections.abc import Mapping, Sequence
from contextlib import suppress
from typing import Any

from kafka import KafkaProducer
from kafka import errors as kafka_errors
from kafka.admin import KafkaAdminClient

from outbox.config import is_secret, safe_kafka_config
from outbox.errors import ConfigError
from outbox.kafka_refusals import connection_failures, raise_refusal, refused_names, scrub
from relay.publisher import ACKNOWLEDGED, Delivery, Message
from relay.sending import (
    every_outcome,
    give_up_after,
    not_authorized_topic,
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
    # How long making a producer may wait for the first broker; bounds a round
    # (and so a SIGTERM) during an outage, instead of kafka-python's 30 s.
    "bootstrap_timeout_ms": 10_000,
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


# The start check waits this long for the first broker: a refused login or
# handshake shows within a second, and a broker that is merely slow to come up
# is waited for by the relay's retries anyway.
CHECK_BOOTSTRAP_MS = 3_000
PROBE_TIMEOUT_MS = 5_000
_UNKNOWN_TOPIC = kafka_errors.UnknownTopicOrPartitionError.errno
_ADMIN_SETTINGS = frozenset(KafkaAdminClient.DEFAULT_CONFIG) - {"client_id"}


class KafkaSending:
    """`relay.publisher.Sending` for one batch handed to a kafka-python producer."""

    __slots__ = ("_checked", "_deliveries", "_owner", "deadline", "futures", "producer", "results", "topics")

    def __init__(self, owner: KafkaPublisher, producer: KafkaProducer, futures: list[Any],
                 results: list[Delivery | None], deadline: float, topics: list[str]) -> None:
        self._owner = owner
        self.topics = topics  # each message's, for the text of a refusal
        self.producer = producer
        self.futures = futures  # None where the message was refused, held back or not sent
        self.results = results
        self.deadline = deadline
        self._checked = 0  # futures before this index are known to be done
        self._deliveries: list[Delivery] | None = None

    def done(self) -> bool:
        futures = self.futures
        for index in range(self._checked, len(futures)):
            future = futures[index]
            if future is not None and not future.is_done:
                self._checked = index
                return False
        self._checked = len(futures)
        return True

    def wait(self) -> list[Delivery]:
        if self._deliveries is None:
            self._deliveries = self._owner._outcomes(self)
        return self._deliveries


class KafkaPublisher:
    """`relay.publisher.Publisher` over kafka-python's `KafkaProducer`."""

    def __init__(self, bootstrap_servers: str, overrides: Mapping[str, Any] | None = None) -> None:
        self._config = producer_config(bootstrap_servers, overrides or {})
        self._overrides = dict(overrides or {})
        self._producer: KafkaProducer | None = None
        self._admin: KafkaAdminClient | None = None
        self._topics_seen: set[str] = set()
        self._give_up = give_up_after(self._config["delivery_timeout_ms"])
        self._newest: KafkaSending | None = None
        log.info("kafka publisher settings: %s", safe_kafka_config(self._config))

    def check(self) -> None:
        """See `relay.publisher.Checked`: one producer made with a short bootstrap."""
        self._connect(bootstrap_ms=min(CHECK_BOOTSTRAP_MS, self._config["bootstrap_timeout_ms"]))

    def publish(self, messages: Sequence[Message]) -> list[Delivery]:
        deliveries = self.send(messages).wait()
        if not all(d.acknowledged for d in deliveries):
            self.close()
        return deliveries

    def send(self, messages: Sequence[Message]) -> KafkaSending:
        """See `relay.publisher.Pipelined`: the batch is in the producer when this returns."""
        producer = self._connect()
        missing = self._missing_topics({m.topic for m in messages})
        futures: list[Any] = [None] * len(messages)
        send = producer.send
        no_metadata: dict[str, BaseException] = {}

        def send_one(index: int, message: Message) -> None:
            if message.topic in no_metadata:
                # One wait of max_block_ms per topic and round, not one per key.
                raise no_metadata[message.topic]
            try:
                futures[index] = send(
                    message.topic, key=message.key, value=message.value, headers=message.headers
                )
            except kafka_errors.KafkaTimeoutError as exc:
                # No metadata in time: a topic deleted since it was seen, or an
                # outage. The next round asks the broker about it again.
                no_metadata[message.topic] = exc
                self._topics_seen.discard(message.topic)
                raise

        # send() raises before the message enters the producer for a message
        # too large, a bad topic, or no metadata for the topic within max_block_ms.
        results = send_in_key_order(messages, send_one, _failed, missing)  # a refused send names its topic
        sending = KafkaSending(self, producer, futures, results, time.monotonic() + self._give_up,
                               [m.topic for m in messages])
        self._newest = sending
        return sending

    def _outcomes(self, sending: KafkaSending) -> list[Delivery]:
        """Wait for `sending`'s futures until its deadline; drop the producer if it passes."""
        futures, producer = sending.futures, sending.producer
        if sending is self._newest and self._producer is not None:
            # Nothing was sent after it: a flush also ends the linger at once.
            with suppress(kafka_errors.KafkaTimeoutError):
                self._producer.flush(timeout=max(sending.deadline - time.monotonic(), 0))
        while not sending.done():
            left = sending.deadline - time.monotonic()
            pending = {f._produce_future for f in futures if f is not None and not f.is_done}
            if left <= 0 or not pending:
                break
            for produce_future in pending:  # one per producer batch, not per message
                produce_future.wait(max(sending.deadline - time.monotonic(), 0))
        results = sending.results
        if not sending.done():
            log.warning("no outcome for %d event(s) after %.0f s; dropping the producer",
                        sum(f is not None and not f.is_done for f in futures), self._give_up)
            if producer is self._producer:
                self._producer = None
            _close_producer(producer, force=True)
        for index, future in enumerate(futures):
            if future is None:
                continue
            if not future.is_done:
                results[index] = Delivery(False, "no acknowledgement before the producer's deadline")
            else:
                results[index] = (ACKNOWLEDGED if future.succeeded()
                                  else _failed(future.exception, sending.topics[index]))
        return every_outcome(results, Delivery(False, "no outcome"))

    def close(self) -> None:
        producer, self._producer = self._producer, None
        admin, self._admin = self._admin, None
        if producer is not None:
            _close_producer(producer)
        try:
            if admin is not None:
                admin.close()
        except Exception:  # closing a broken client must not hide the real error
            log.debug("error while closing a Kafka client", exc_info=True)

    def _connect(self, *, bootstrap_ms: int | None = None) -> KafkaProducer:
        if self._producer is not None:
            return self._producer
        config = dict(self._config)
        if bootstrap_ms is not None:
            config["bootstrap_timeout_ms"] = bootstrap_ms
        with connection_failures() as failures:
            try:
                self._producer = KafkaProducer(**config)
            except kafka_errors.KafkaTimeoutError:
                # kafka-python says only "Unable to bootstrap"; what the broker
                # refused was logged on the way, and is the line worth showing.
                raise_refusal(failures, self._config)
                raise
            except (kafka_errors.KafkaConfigurationError, ValueError, TypeError, AssertionError) as exc:
                text = scrub(str(exc), self._config)
                raise ConfigError(
                    _which_setting(text, self._overrides),
                    f"kafka-python refused the producer settings: {text}",
                ) from None
        return self._producer

    def _missing_topics(self, topics: set[str]) -> set[str]:
        """Which of `topics` the broker answers do not exist, in one metadata request.

        kafka-python's send() would instead wait max_block_ms for each key of
        such a topic. A topic once seen is not asked about again: if it is
        deleted later, its sends fail on their own.
        """
        unknown = topics - self._topics_seen
        if not unknown:
            return set()
        if self._admin is None:
            settings = {k: v for k, v in self._config.items() if k in _ADMIN_SETTINGS}
            # One metadata answer takes milliseconds; waiting longer only delays
            # a SIGTERM during an outage (the round is retried anyway).
            short = min(self._config["request_timeout_ms"], PROBE_TIMEOUT_MS)
            self._admin = KafkaAdminClient(**{
                **settings, "client_id": "outbox-relay-metadata",
                "request_timeout_ms": short, "bootstrap_timeout_ms": short,
            })
        try:
            answers = self._admin.describe_topics(sorted(unknown))
        except Exception:
            admin, self._admin = self._admin, None
            admin.close()
            raise
        missing: set[str] = set()
        for described in answers:
            name, code = described.get("name") or described.get("topic"), described.get("error_code")
            if code == 0:
                self._topics_seen.add(name)
            elif code == _UNKNOWN_TOPIC:
                missing.add(name)
        return missing


def _which_setting(text: str, overrides: Mapping[str, Any]) -> str:
    """The OUTBOX_KAFKA_* variable a client's complaint is about: the one whose
    name or (non-secret) value it quotes."""
    for name, value in overrides.items():
        if name in text or (not is_secret(name) and isinstance(value, str) and len(value) > 2
                            and value in text):
            return f"OUTBOX_KAFKA_{name.upper()}"
    return "OUTBOX_KAFKA_*"


def _close_producer(producer: KafkaProducer, *, force: bool = False) -> None:
    """Close `producer` even while records are still pending in it.

    `force`: send nothing more at all, fail what is pending at once (a
    producer given up on, see `relay.sending.give_up_after`).

    kafka-python 3's close() flushes first and, when records are still
    pending (a deleted topic, a broker that went away), raises from that
    flush before it stops its sender: the producer is left half-closed, and
    its __del__ later prints that error as a traceback on stderr, in the
    middle of the relay's log. So after a failed close the sender is
    force-closed, which fails what is pending now (those events are still
    in the outbox and go out again, with the same ids, from the next
    producer). Uses private attributes of the pinned kafka-python 3; where
    they are missing, only the late traceback remains.
    """
    if not force:
        try:
            producer.close(timeout=5)
            return
        except Exception:  # closing a broken producer must not hide the real error
            log.debug("kafka-python could not close the producer cleanly; forcing it", exc_info=True)
    sender = getattr(producer, "_sender", None)
    if sender is not None and sender.is_alive():
        sender.force_close()
        sender.join(5)
    producer._closed = True  # its __del__ would try (and fail) to flush again


def _failed(exc: BaseException | None, topic: str = "") -> Delivery:
    if exc is None:
        return Delivery(False, "unknown delivery failure")
    if isinstance(exc, kafka_errors.TopicAuthorizationFailedError):
        return not_authorized_topic(", ".join(refused_names(exc, [topic or str(exc)])))
    retriable = not isinstance(exc, (*PERMANENT_ERRORS, ValueError, TypeError))
    return Delivery(False, f"{type(exc).__name__}: {exc}", retriable=retriable)
