"""What the consumer reads from Kafka: a record's shape, typed, and its decoding into an `Event`.

    KafkaRecord            topic, partition, offset, key, value, headers (kafka-python's
                           ConsumerRecord has them; so can a test's own record)
    decode_record(r)       the Event, or MalformedMessageError
    try_decode(r)          the Event, or the MalformedMessageError as a value (a batch goes on)
    where(first, n)        the log fields of a stretch of records

kafka-python is untyped; this Protocol is the one place that says which of
a record's attributes the kit relies on, so nothing else needs `Any`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from outbox.envelope import decode
from outbox.errors import MalformedMessageError
from outbox.event import Event

__all__ = ["KafkaRecord", "decode_record", "try_decode", "where"]


class KafkaRecord(Protocol):
    """One consumed message, as the broker delivered it: raw bytes, nothing decoded."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes]] | None: ...


def decode_record(record: KafkaRecord) -> Event:
    return decode(
        topic=record.topic, partition=record.partition, offset=record.offset,
        key=record.key, value=record.value, headers=record.headers,
    )


def try_decode(record: KafkaRecord) -> Event | MalformedMessageError:
    try:
        return decode_record(record)
    except MalformedMessageError as exc:
        return exc


def where(first: KafkaRecord, messages: int) -> str:
    """The log fields of a stretch of messages: where it starts, how many."""
    return (f"topic={first.topic} partition={first.partition} offset={first.offset} "
            f"messages={messages}")
