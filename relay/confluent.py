"""A second Kafka publisher: confluent-kafka (librdkafka), for relays where kafka-python is the limit.

Optional: `pip install confluent-kafka` (a binary wheel that bundles
librdkafka). Same promises as `relay/kafka.py`, checked the same way before
use: `acks=all`, `enable.idempotence=true`, at most 5 requests in flight per
connection, retries not disabled; anything weaker is refused with a
`ConfigError`. Two settings are fixed on top:

- `partitioner=murmur2_random`: the Java client's (and kafka-python's)
  partitioner, so switching publishers never moves a key to another
  partition (librdkafka's own default, CRC32, would);
- `enable.gapless.guarantee=true`: if librdkafka would have to leave a gap
  in a partition's sequence (a batch failed for good while later ones
  succeed), it fails the whole producer instead, so a later event of a key
  is never acknowledged while an earlier one is not.

As in `relay/kafka.py`, after any failed delivery the producer is thrown
away and the next batch gets a new one (a new producer id).

Settings: the relay passes its `OUTBOX_KAFKA_*` overrides in kafka-python
spelling (`security_protocol`); they are translated to librdkafka names
(`security.protocol`, `sasl_plain_username` -> `sasl.username`, ...).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from outbox.config import safe_kafka_config
from outbox.errors import ConfigError
from outbox.kafka_refusals import refused_login, refused_tls, scrub
from relay.publisher import ACKNOWLEDGED, Delivery, Message
from relay.sending import (
    every_outcome,
    give_up_after,
    not_authorized_topic,
    require_safe_delivery,
    send_in_key_order,
)

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "acks": "all",
    "enable.idempotence": True,
    "max.in.flight.requests.per.connection": 5,
    "linger.ms": 5,
    "batch.size": 256 * 1024,
    "delivery.timeout.ms": 30_000,
    "request.timeout.ms": 10_000,
    "retry.backoff.ms": 100,
    "reconnect.backoff.max.ms": 5_000,
    "client.id": "outbox-relay",
    # librdkafka's own default (1,000,000) is what `publish` accepts for key +
    # data + headers, before the relay adds the CloudEvents headers: an event at
    # the limit would be refused. This is the broker's own default limit for a
    # record batch, and kafka-python's max_request_size is about the same.
    "message.max.bytes": 1_048_588,
}

FIXED: dict[str, Any] = {
    "partitioner": "murmur2_random",
    "enable.gapless.guarantee": True,
}

# kafka-python names whose librdkafka name is not just "_" -> "."
_RENAMED = {
    "sasl_plain_username": "sasl.username",
    "sasl_plain_password": "sasl.password",
    "ssl_cafile": "ssl.ca.location",
    "ssl_certfile": "ssl.certificate.location",
    "ssl_keyfile": "ssl.key.location",
    "ssl_password": "ssl.key.password",
    "max_in_flight_requests_per_connection": "max.in.flight.requests.per.connection",
    "max_request_size": "message.max.bytes",
    "max_block_ms": None,  # kafka-python only: send() never blocks on metadata here
    "api_version": None,
}

PERMANENT_ERRORS = frozenset({
    KafkaError.MSG_SIZE_TOO_LARGE,
    KafkaError.INVALID_MSG_SIZE,
    KafkaError.RECORD_LIST_TOO_LARGE,
    KafkaError.TOPIC_EXCEPTION,
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError._INVALID_ARG,
})


def translate(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """kafka-python setting names (as in OUTBOX_KAFKA_*) to librdkafka names."""
    result: dict[str, Any] = {}
    for name, value in overrides.items():
        if "." in name:
            result[name] = value
            continue
        target = _RENAMED.get(name, name.replace("_", "."))
        if target is not None:
            result[target] = value
    return result


def confluent_config(bootstrap_servers: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The producer settings: defaults, then overrides, refused if unsafe."""
    wanted = translate(overrides)
    config = {**DEFAULTS, **wanted, "bootstrap.servers": bootstrap_servers}
    require_safe_delivery(
        acks=config["acks"], idempotence=config["enable.idempotence"],
        in_flight=config["max.in.flight.requests.per.connection"],
        retries=config.get("retries", config.get("message.send.max.retries", 1)),
    )
    config["acks"] = "all"
    for refused in ("transactional.id", *FIXED):
        if refused in wanted:
            raise ConfigError(
                f"OUTBOX_KAFKA_{refused.replace('.', '_').upper()}",
                "is set by the relay itself (it decides keys, partitions and ordering)",
            )
    return {**config, **FIXED}


# The start check waits this long for cluster metadata: a refused login or
# handshake shows within a second; a broker that is merely not up yet is
# waited for by the relay's retries.
CHECK_TIMEOUT = 3.0
# One metadata answer takes milliseconds; waiting longer only delays a SIGTERM
# during an outage (the round is retried anyway).
PROBE_TIMEOUT = 5.0
_PROPERTY = re.compile(r'property "([^"]+)"')


class ConfluentSending:
    """`relay.publisher.Sending` for one batch handed to a confluent-kafka producer."""

    __slots__ = (
        "_deliveries",
        "_owner",
        "deadline",
        "expected",
        "producer",
        "refused",
        "reported",
        "reports",
    )

    def __init__(self, owner: ConfluentPublisher, producer: Producer, size: int, deadline: float) -> None:
        self._owner = owner
        self.producer = producer
        self.deadline = deadline
        self.reports: list[Delivery | None] = [None] * size  # filled by delivery reports
        self.refused: list[Delivery | None] = [None] * size  # outcomes known at send time
        self.expected = 0  # messages librdkafka took
        self.reported = 0
        self._deliveries: list[Delivery] | None = None

    def report(self, index: int, err: KafkaError | None, topic: str) -> None:
        self.reports[index] = ACKNOWLEDGED if err is None else _failed(err, topic)
        self.reported += 1

    def done(self) -> bool:
        if self.reported < self.expected:
            self.producer.poll(0)  # serves the delivery reports that are in
        return self.reported >= self.expected

    def wait(self) -> list[Delivery]:
        if self._deliveries is None:
            self._deliveries = self._owner._outcomes(self)
        return self._deliveries


class ConfluentPublisher:
    """`relay.publisher.Publisher` over confluent-kafka's `Producer`."""

    def __init__(self, bootstrap_servers: str, overrides: Mapping[str, Any] | None = None) -> None:
        self._config = confluent_config(bootstrap_servers, overrides or {})
        self._producer: Producer | None = None
        self._overrides = dict(overrides or {})
        self._topics_seen: set[str] = set()
        self._client_errors: list[KafkaError] = []
        self._give_up = give_up_after(self._config["delivery.timeout.ms"])
        self._newest: ConfluentSending | None = None
        log.info("confluent publisher settings: %s", safe_kafka_config(self._config))

    def check(self) -> None:
        """See `relay.publisher.Checked`: the producer made once, metadata fetched once."""
        producer = self._connect()
        try:
            producer.list_topics(timeout=CHECK_TIMEOUT)
        except KafkaException:
            self._raise_refusal()
            raise

    def publish(self, messages: Sequence[Message]) -> list[Delivery]:
        deliveries = self.send(messages).wait()
        if not all(d.acknowledged for d in deliveries):
            self.close()
        return deliveries

    def send(self, messages: Sequence[Message]) -> ConfluentSending:
        """See `relay.publisher.Pipelined`: the batch is in librdkafka's queue when this returns."""
        producer = self._connect()
        missing = self._missing_topics(producer, {m.topic for m in messages})
        sending = ConfluentSending(self, producer, len(messages), time.monotonic() + self._give_up)
        report = sending.report
        producing = [""]  # the topic of the message being produced, for a refusal's text

        def send_one(index: int, message: Message) -> None:
            # Delivery reports can already arrive while later messages are
            # produced (_produce serves them when the queue is full).
            producing[0] = message.topic
            self._produce(producer, message, lambda err, _msg: report(index, err, message.topic))
            sending.expected += 1

        sending.refused = send_in_key_order(
            messages, send_one, lambda exc: _refused(exc, producing[0]), missing
        )
        self._newest = sending
        return sending

    def _outcomes(self, sending: ConfluentSending) -> list[Delivery]:
        """Serve delivery reports until `sending` is done or its deadline; then drop the producer."""
        producer = sending.producer
        while not sending.done():
            left = sending.deadline - time.monotonic()
            if left <= 0:
                break
            if sending is self._newest:
                producer.flush(left)  # nothing sent after it: also ends the linger at once
            else:
                producer.poll(min(left, 0.1))
        if not sending.done():
            log.warning("no delivery report for %d event(s) after %.0f s; dropping the producer",
                        sending.expected - sending.reported, self._give_up)
            if producer is self._producer:
                self._producer = None
            # Nothing more leaves this producer: what landed is a gapless prefix.
            _purge(producer, in_flight=True)
        reports = sending.reports
        return every_outcome(
            [r if r is not None else reports[i] for i, r in enumerate(sending.refused)],
            Delivery(False, "no delivery report before the producer's deadline"),
        )

    def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            # Nothing new is sent: queued messages are dropped (their events
            # stay in the outbox and go out again with the same ids).
            _purge(producer, in_flight=False)

    def _produce(self, producer: Producer, message: Message, on_delivery: Any) -> None:
        while True:
            try:
                producer.produce(
                    message.topic, value=message.value, key=message.key,
                    headers=list(message.headers),  # a fresh list[tuple[str, bytes]]
                    on_delivery=on_delivery,
                )
                return
            except BufferError:
                # librdkafka's local queue is full: serve delivery reports, then retry.
                producer.poll(0.05)

    def _connect(self) -> Producer:
        if self._producer is None:
            self._client_errors.clear()
            try:
                self._producer = Producer({
                    **self._config, "error_cb": self._client_errors.append, "logger": _librdkafka_log,
                })
            except KafkaException as exc:
                raise self._refused_setting(exc) from None
        return self._producer

    def _missing_topics(self, producer: Producer, topics: set[str]) -> set[str]:
        """Which of `topics` the broker answers do not exist, asked once each per
        round until seen (produce() would queue their messages for
        delivery.timeout.ms and then report a failure that looks like an outage)."""
        missing: set[str] = set()
        for topic in sorted(topics - self._topics_seen):
            try:
                metadata = producer.list_topics(topic, timeout=PROBE_TIMEOUT)
            except KafkaException:
                self._raise_refusal()
                raise
            found = metadata.topics.get(topic)
            error = found.error if found is not None else None
            if found is not None and error is None:
                self._topics_seen.add(topic)
            elif error is not None and error.code() in _UNKNOWN_TOPIC:
                missing.add(topic)
        return missing

    def _raise_refusal(self) -> None:
        """A failed metadata request after a refused login or handshake is not an outage."""
        if self._producer is not None:
            self._producer.poll(0)  # serves error_cb
        for err in self._client_errors:
            detail = scrub(f"KafkaError {err.name()}: {err.str()}", self._config)
            if err.code() == KafkaError._AUTHENTICATION:
                raise refused_login(detail) from None
            if err.code() == KafkaError._SSL:
                raise refused_tls(detail) from None

    def _refused_setting(self, exc: KafkaException) -> ConfigError:
        """librdkafka refused a value (`_INVALID_ARG`): name the OUTBOX_KAFKA_* variable it came from."""
        text = scrub(str(exc.args[0].str() if exc.args and isinstance(exc.args[0], KafkaError) else exc),
                     self._config)
        match = _PROPERTY.search(text)
        prop = match.group(1) if match else ""
        names = {prop, *(alias for alias, real in _ALIASES.items() if real == prop), _ALIASES.get(prop, prop)}
        source = next((n for n in self._overrides if set(translate({n: 0})) & names), None)
        variable = f"OUTBOX_KAFKA_{(source or prop.replace('.', '_') or '*').upper()}"
        return ConfigError(variable, f"librdkafka refused the producer settings: {text}")


# librdkafka reports a refused value under its own name for the setting.
_ALIASES = {
    "linger.ms": "queue.buffering.max.ms",
    "retries": "message.send.max.retries",
    "delivery.timeout.ms": "message.timeout.ms",
    "acks": "request.required.acks",
    "compression.type": "compression.codec",
}


class _OncePerCause(logging.Filter):
    """librdkafka logs a refused login once per reconnect (every few hundred
    ms); let each distinct line through once a minute."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        cause = re.sub(r"\d+", "#", record.getMessage())
        last = self._seen.get(cause)
        if last is not None and record.created - last < 60:
            return False
        self._seen[cause] = record.created
        return True


_UNKNOWN_TOPIC = frozenset({KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC})
# librdkafka's own log lines (e.g. one per failed reconnect) go through logging,
# not straight to stderr, so the daemon decides what is shown.
_librdkafka_log = logging.getLogger("relay.librdkafka")
_librdkafka_log.addFilter(_OncePerCause())


def _purge(producer: Producer, *, in_flight: bool) -> None:
    try:
        producer.purge(in_queue=True, in_flight=in_flight)
        producer.flush(0)  # serves the purged messages' reports
    except Exception:  # closing a broken producer must not hide the real error
        log.debug("error while closing the confluent producer", exc_info=True)


def _refused(exc: Exception, topic: str) -> Delivery | None:
    """produce() refused the message before it entered the producer (too large,
    bad topic): its own failure. Anything else is the client's, and propagates."""
    if not isinstance(exc, (KafkaException, ValueError, TypeError)):
        return None
    err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else exc
    return _failed(err, topic)


def _failed(err: KafkaError | BaseException, topic: str = "") -> Delivery:
    if isinstance(err, KafkaError):
        if err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED:
            return not_authorized_topic(topic or "(this event's topic)")
        # A fatal error (e.g. the gapless guarantee) is the producer's, not the
        # event's: a new producer retries it.
        retriable = err.fatal() or err.code() not in PERMANENT_ERRORS
        return Delivery(False, f"KafkaError {err.name()}: {err.str()}", retriable=retriable)
    retriable = not isinstance(err, (ValueError, TypeError))
    return Delivery(False, f"{type(err).__name__}: {err}", retriable=retriable)
