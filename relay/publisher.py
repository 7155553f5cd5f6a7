"""The contract between the relay loop and a message broker.

A `Publisher` takes a batch of messages in position order and reports, for
each one, whether the broker acknowledged it. The relay deletes an event only
after its `Delivery` says `acknowledged`. Promises an implementation keeps:

- Order: messages with the same key reach the broker in the order given,
  also across retries (Kafka: the idempotent producer, at most 5 requests in
  flight per connection).
- Idempotence: the publisher's own retries never write a message twice.
- Acknowledgement means durable: Kafka `acks=all`.
- `publish` blocks until every message is acknowledged or failed; it never
  returns a message in neither state. Not thread-safe: one relay loop owns it.
- `close` flushes nothing new and may be called twice.
- A message for a topic the broker says does not exist is that message's own
  failure (`missing_topic`), found with one metadata request per round, not
  by waiting for the client's metadata timeout once per key.

An implementation may also offer `check()` (see `Checked`): the relay calls
it once at start, so that a setting the client or the broker refuses is one
clear `ConfigError` line and exit 2, not an outage retried forever.

Kafka is one implementation (`relay/kafka.py`); another transport is another
file with the same two methods.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

from outbox.config import is_secret
from outbox.errors import ConfigError, mask_secrets


class Message(NamedTuple):
    """One event ready for the wire (see `outbox/envelope.py` for the headers).

    A NamedTuple, not a frozen dataclass: just as immutable, and about three
    times cheaper to make, which counts once per event in the relay loop.
    """

    event_id: str  # the event's UUID in canonical text form, as in its ce_id header
    topic: str
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class Delivery:
    """The outcome for one message. `retriable` is False for errors that will
    recur for this message whatever the broker's health (too large, bad topic)."""

    acknowledged: bool
    error: str | None = None
    retriable: bool = True
    attempted: bool = True  # False: held back or never sent, so not this message's failure


ACKNOWLEDGED = Delivery(acknowledged=True)
HELD_BACK = Delivery(False, "held back behind a failed event of its key", attempted=False)


def missing_topic(topic: str) -> Delivery:
    """The outcome for a message whose topic the broker answered does not exist:
    the event's own failure (counted, parked at max_attempts), never an outage."""
    return Delivery(
        False,
        f"UnknownTopic: topic {topic!r} does not exist on the broker (and it does not create "
        "topics on first use); create it, then replay the parked events: outbox parked replay",
        retriable=False,
    )


SASL_SETTINGS = ("OUTBOX_KAFKA_SECURITY_PROTOCOL, OUTBOX_KAFKA_SASL_MECHANISM, "
                 "OUTBOX_KAFKA_SASL_PLAIN_USERNAME, OUTBOX_KAFKA_SASL_PLAIN_PASSWORD")
SSL_SETTINGS = "OUTBOX_KAFKA_SECURITY_PROTOCOL, OUTBOX_KAFKA_SSL_CAFILE, OUTBOX_KAFKA_SSL_*"


def refused_login(detail: str) -> ConfigError:
    return ConfigError(
        "OUTBOX_KAFKA_SASL_PLAIN_PASSWORD",
        f"the broker refused the SASL login ({detail}); check {SASL_SETTINGS}",
    )


def refused_tls(detail: str) -> ConfigError:
    return ConfigError(
        "OUTBOX_KAFKA_SSL_CAFILE", f"the TLS handshake with the broker failed ({detail}); check {SSL_SETTINGS}"
    )


def scrub(text: str, config: Mapping[str, Any]) -> str:
    """A client's error text with the values of secret settings masked as well."""
    for name, value in config.items():
        if is_secret(name) and isinstance(value, str) and value:
            text = text.replace(value, "***")
    return mask_secrets(text)


def require_safe_delivery(*, acks: object, idempotence: object, in_flight: object, retries: object) -> None:
    """Refuse producer settings that would break the promises above.

    Every implementation calls this with its client's values; the errors name
    the OUTBOX_KAFKA_* variable to change, whatever the client calls it.
    """
    if str(acks) not in ("all", "-1"):
        raise ConfigError(
            "OUTBOX_KAFKA_ACKS", f"{acks!r} can lose acknowledged events; the relay needs 'all'"
        )
    if idempotence is not True:
        raise ConfigError(
            "OUTBOX_KAFKA_ENABLE_IDEMPOTENCE",
            "must stay true: without it producer retries duplicate and reorder events",
        )
    if not isinstance(in_flight, int) or not 1 <= in_flight <= 5:
        raise ConfigError(
            "OUTBOX_KAFKA_MAX_IN_FLIGHT_REQUESTS_PER_CONNECTION",
            f"{in_flight!r} is out of range 1..5; more breaks per-key order",
        )
    if retries == 0:
        raise ConfigError("OUTBOX_KAFKA_RETRIES", "0 disables the idempotent producer's retries")


def send_in_key_order(
    messages: Sequence[Message],
    send: Callable[[int, Message], object],
    refused: Callable[[Exception], Delivery | None],
    missing: Collection[str] = (),
) -> list[Delivery | None]:
    """Hand each message (with its index) to a client's `send`, in order.

    Returns the outcomes known at once, None for messages the client took. A
    message the client refuses before taking it (too large, bad topic, no
    metadata in time) fails alone, and every later message of its key is
    held back, so none overtakes it; other keys go on. `refused` turns the
    client's exception into the message's `Delivery`, or returns None when
    the exception means the client itself is broken: that one propagates.
    A message for a topic in `missing` is not sent: it fails as `missing_topic`.
    """
    results: list[Delivery | None] = [None] * len(messages)
    blocked: set[tuple[str, bytes]] = set()
    for index, message in enumerate(messages):
        if blocked and (message.topic, message.key) in blocked:
            results[index] = HELD_BACK
            continue
        if missing and message.topic in missing:
            results[index] = missing_topic(message.topic)
            blocked.add((message.topic, message.key))
            continue
        try:
            send(index, message)
        except Exception as exc:
            delivery = refused(exc)
            if delivery is None:
                raise
            results[index] = delivery
            blocked.add((message.topic, message.key))
    return results


def flush_timeout(delivery_timeout_ms: float) -> float:
    """Seconds a publisher waits for a batch's outcomes before it counts the rest as failed.

    delivery.timeout.ms bounds every send, in theory; kafka-python has been
    seen to leave a batch that was in flight when the broker died unresolved
    forever, and an unbounded wait would stall the relay (and its SIGTERM).
    The margin covers the serving of delivery reports.
    """
    return delivery_timeout_ms / 1000 + 5


def every_outcome(results: Sequence[Delivery | None], missing: Delivery) -> list[Delivery]:
    """`results` with `missing` for any message the client never reported on:
    a publisher never returns a message in neither state."""
    return [missing if r is None else r for r in results]


class Publisher(Protocol):
    def publish(self, messages: Sequence[Message]) -> list[Delivery]:
        """Send `messages` in order; one `Delivery` per message, same order."""
        ...

    def close(self) -> None:
        """Release connections. Safe to call more than once."""
        ...


@runtime_checkable
class Checked(Protocol):
    def check(self) -> None:
        """Make the client and reach the broker once, before the first round.

        Raises `ConfigError` (naming the OUTBOX_KAFKA_* variable) for what is
        wrong whatever the broker's health: a value the client refuses, SASL
        credentials or a TLS handshake the broker refuses. Any other exception
        means the broker is not reachable yet, which the relay waits out.
        """
        ...
