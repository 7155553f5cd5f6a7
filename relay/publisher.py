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
- `send` (see `Pipelined`) is the same without the wait: it hands a batch to
  the producer and returns a `Sending`, so that the relay can fetch and send
  the next batch while this one's acknowledgements are on their way. Batches
  sent one after the other keep the order above between them. `wait` is
  bounded by the producer's own delivery timeout, and gives up a little
  *before* the producer would expire a batch by itself (`sending.give_up_after`):
  it then drops the producer, so the producer never re-sequences later
  batches past one it failed (see relay/window.py for why that matters).
- `close` flushes nothing new and may be called twice.
- A message for a topic the broker says does not exist is that message's own
  failure (`relay.sending.missing_topic`), found with one metadata request per round, not
  by waiting for the client's metadata timeout once per key.

An implementation may also offer `check()` (see `Checked`): the relay calls
it once at start, so that a setting the client or the broker refuses is one
clear `ConfigError` line and exit 2, not an outage retried forever.

Implementations: `relay/kafka.py` (kafka-python) and `relay/confluent.py`
(librdkafka), both built on the helpers in `relay/sending.py`. Another
transport is another file with the same two methods, and one line in the
table of `relay/publishers.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable


class Publisher(Protocol):
    def publish(self, messages: Sequence[Message]) -> list[Delivery]:
        """Send `messages` in order; one `Delivery` per message, same order."""
        ...

    def close(self) -> None:
        """Release connections. Safe to call more than once."""
        ...


class Sending(Protocol):
    """A batch handed to the producer, its outcomes on their way."""

    def done(self) -> bool:
        """True once every message of the batch is acknowledged or failed; never blocks."""
        ...

    def wait(self) -> list[Delivery]:
        """Block until `done()`; one `Delivery` per message, in the order sent."""
        ...


@runtime_checkable
class Pipelined(Protocol):
    def send(self, messages: Sequence[Message]) -> Sending:
        """Hand `messages` to the producer in order and return at once."""
        ...


class Settled:
    """A `Sending` whose outcomes are known already: how a publisher without
    `send` (one that only blocks in `publish`) takes part in the relay's window."""

    __slots__ = ("_deliveries",)

    def __init__(self, deliveries: list[Delivery]) -> None:
        self._deliveries = deliveries

    def done(self) -> bool:
        return True

    def wait(self) -> list[Delivery]:
        return self._deliveries


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
