"""What the Kafka publishers share to keep the `relay.publisher` contract.

Both `relay/kafka.py` and `relay/confluent.py` send a batch through
`send_in_key_order` (a refused message holds back the rest of its key),
bound their wait with `give_up_after`, fill in `every_outcome`, refuse
unsafe producer settings with `require_safe_delivery`, and turn a refused
login or handshake into one `ConfigError` with `outbox.kafka_refusals` (shared
with the consumer). Every error names the OUTBOX_KAFKA_* variable to change,
whatever the client calls the setting.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

from outbox.errors import ConfigError
from relay.publisher import Delivery, Message

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


def not_authorized_topic(topic: str) -> Delivery:
    """The outcome for a message the broker's ACLs do not let this user write: the
    event's own failure (counted, parked at max_attempts), not an outage, and not a
    reason to stop the relay, whose other topics may well be allowed."""
    return Delivery(
        False,
        f"TopicAuthorizationFailed: the broker's ACLs do not allow this relay's user "
        f"(OUTBOX_KAFKA_SASL_PLAIN_USERNAME) to write topic {topic}; grant WRITE on it, "
        "then replay the parked events: outbox parked replay",
        retriable=False,
    )


def require_safe_delivery(*, acks: object, idempotence: object, in_flight: object, retries: object) -> None:
    """Refuse producer settings that would break the promises of `relay.publisher`.

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


def give_up_after(delivery_timeout_ms: float) -> float:
    """Seconds a publisher waits for a batch's outcomes before it drops the producer.

    A little *less* than the producer's own delivery timeout, on purpose.
    When a producer expires a batch by itself it goes on with the batches
    behind it under fresh sequence numbers (kafka-python resets its producer
    id; librdkafka's gapless guarantee does not cover timeouts), so a later
    event of a key could land while an earlier one did not. Giving up first,
    and dropping the producer without sending anything more
    (`relay/window.py` explains the whole argument), leaves what landed a
    gapless prefix. It also bounds the wait where kafka-python has been seen
    to leave a batch unresolved forever after its broker died.
    """
    seconds = delivery_timeout_ms / 1000
    return max(seconds - min(5.0, seconds / 5), 0.1)


def every_outcome(results: Sequence[Delivery | None], missing: Delivery) -> list[Delivery]:
    """`results` with `missing` for any message the client never reported on:
    a publisher never returns a message in neither state."""
    return [missing if r is None else r for r in results]
