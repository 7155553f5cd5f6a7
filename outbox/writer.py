"""The write path: `publish` adds an event to the caller's database transaction.

This module never commits, flushes or opens a connection. The event row is
added to the session (or executed on the connection) the caller passes in, so
it is committed exactly when the business rows are, and a rollback discards
it. Every check runs before anything is added: a refused event raises an
`InvalidEventError` and leaves the transaction as it was. That includes what
the database itself would refuse (a NUL character in a text or jsonb
column, a string that is not valid Unicode): PostgreSQL would abort the
caller's whole transaction, business rows and all, for one bad header.
"""

from __future__ import annotations

import json
import re
import uuid
import weakref
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Insert, insert
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Session

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from outbox.config import env_int
from outbox.errors import InvalidEventError, PayloadTooLargeError
from outbox.event import BYTES_CONTENT_TYPE, JSON_CONTENT_TYPE, Event
from outbox.schema import OutboxRow, outbox_event
from outbox.tracing import create_span

MAX_PAYLOAD_BYTES_ENV = "OUTBOX_MAX_PAYLOAD_BYTES"
# Kafka's default message.max.bytes is 1 MiB for key, value and headers
# together; leave room for the CloudEvents headers the relay adds.
DEFAULT_MAX_PAYLOAD_BYTES = 1_000_000

# Kafka's own rule for topic names (kafka.common.internals.Topic); used with
# fullmatch, since `$` would also match before a trailing newline.
_TOPIC_NAME = re.compile(r"[a-zA-Z0-9._-]{1,249}")
# Headers the relay writes itself; a user header with one of these names
# would make the message ambiguous.
RESERVED_HEADER_PREFIX = "ce_"
RESERVED_HEADERS = frozenset({"content-type"})

# One encoder for every event: json.dumps with non-default arguments builds a
# new JSONEncoder on each call, which is a measurable share of `publish`.
_JSON = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))

# The INSERT is the same statement on every call; building it once spares
# SQLAlchemy the construction and cache-key walk of a fresh `insert()`.
_INSERT: Insert = insert(outbox_event)
_COLUMNS = ("id", "topic", "key", "type", "payload", "content_type", "headers", "created_at")


def publish(
    session: Session | AsyncSession | Connection,
    *,
    topic: str,
    key: str,
    type: str,
    data: Any,
    headers: Mapping[str, str] | None = None,
    event_id: uuid.UUID | str | None = None,
    max_payload_bytes: int | None = None,
) -> Event:
    """Add one event to the current transaction of `session`, and return it.

    `session` is a SQLAlchemy `Session`, an `AsyncSession` or a `Connection`.
    With a `Session` or a `Connection` the INSERT runs at once inside its
    transaction (beginning it if needed; your other pending ORM objects are
    not flushed). With an `AsyncSession` call it as is (no await): it only
    adds an object to the session, and the row is written by the session's
    next flush, at the latest by `await session.commit()`.

    Nothing is committed here. The event exists if and only if the caller's
    transaction commits; after a rollback there is no trace of it.

    `data` is a JSON-serialisable value, or `bytes` (published as
    application/octet-stream). `event_id` defaults to a new UUID; pass your
    own to make the event's identity follow from your data. Raises
    `InvalidEventError` (or `PayloadTooLargeError`) on bad input, before
    anything is added to the transaction.
    """
    with create_span(topic, headers) as span:  # OpenTelemetry, when in use (outbox/tracing.py)
        event, values = event_row(
            topic=topic, key=key, type=type, data=data, headers=span.headers, event_id=event_id,
            max_payload_bytes=max_payload_bytes,
        )
        span.message_id(event.id)
        _insert(session, values)
    return event


def _insert(session: Session | AsyncSession | Connection, values: dict[str, Any]) -> None:
    if isinstance(session, Session):
        # The INSERT runs on the session's own connection and transaction,
        # not through the ORM unit of work, which would cost more Python time
        # than the rest of a typical payment transaction (bench/, write cost).
        _execute_insert(session.connection(bind_arguments={"mapper": OutboxRow}), values)
    elif _is_async(session, "AsyncSession"):
        session.add(OutboxRow(**values))  # type: ignore[union-attr]  # narrowed by _is_async
    elif isinstance(session, Connection):
        _execute_insert(session, values)
    elif _is_async(session, "AsyncConnection"):
        raise InvalidEventError(
            "session",
            "an AsyncConnection needs `await publish_async(conn, ...)`; "
            "an AsyncSession works with plain publish()",
        )
    else:
        raise InvalidEventError(
            "session",
            f"expected a SQLAlchemy Session, AsyncSession or Connection, got {type_name(session)}",
        )


async def publish_async(conn: AsyncConnection, **fields: Any) -> Event:
    """`publish` for an `AsyncConnection` (Core, no ORM session); same fields, same rules."""
    with create_span(fields.get("topic", ""), fields.get("headers")) as span:
        event, values = event_row(**{**fields, "headers": span.headers})
        span.message_id(event.id)
        await conn.execute(_INSERT, values)
    return event


def _execute_insert(conn: Connection, values: dict[str, Any]) -> None:
    sql = _driver_sql(conn.dialect)
    if sql is None or conn.get_execution_options().get("schema_translate_map"):
        conn.execute(_INSERT, values)
        return
    # With psycopg, the statement compiled once is executed as driver SQL: the
    # same text SQLAlchemy would send (so psycopg prepares it server-side the
    # same way), through the same Connection, so engine events, logging and
    # exception wrapping (IntegrityError on a reused event id) are unchanged;
    # only the per-call compile-cache lookup and bind processing are skipped,
    # which is about a quarter of the Python time of `publish`.
    params = dict(values)
    params["headers"] = _JSON.encode(values["headers"])  # the statement casts it ::JSONB
    conn.exec_driver_sql(sql, params)


# Per dialect instance (one per engine), since the compiled text depends on its settings.
_DRIVER_SQL: weakref.WeakKeyDictionary[Dialect, str | None] = weakref.WeakKeyDictionary()


def _driver_sql(dialect: Dialect) -> str | None:
    """The INSERT as psycopg's SQL text, or None where only the Core statement will do."""
    try:
        return _DRIVER_SQL[dialect]
    except KeyError:
        sql: str | None = None
        # Only psycopg 3 is known to take these Python values (uuid.UUID,
        # datetime, bytes, str) as they are; other drivers need SQLAlchemy's
        # bind processing. The rendered casts (::UUID, ::JSONB) come from
        # the psycopg dialect and are what lets a JSON string become jsonb.
        if dialect.driver == "psycopg" and dialect.paramstyle == "pyformat":
            compiled = _INSERT.compile(dialect=dialect, column_keys=list(_COLUMNS))
            if "::JSONB" in compiled.string:
                sql = compiled.string
        _DRIVER_SQL[dialect] = sql
        return sql


def event_row(
    *,
    topic: str,
    key: str,
    type: str,
    data: Any,
    headers: Mapping[str, str] | None = None,
    event_id: uuid.UUID | str | None = None,
    max_payload_bytes: int | None = None,
) -> tuple[Event, dict[str, Any]]:
    """The validated event and the `outbox_event` row that stores it."""
    event = build_event(
        topic=topic, key=key, type=type, data=data, headers=headers, event_id=event_id,
    )
    limit = _limit(max_payload_bytes)
    payload = encode_data(data)
    key_size = len(key.encode())
    headers_size = sum(len(k.encode()) + len(v.encode()) for k, v in event.headers.items())
    # Name the part that alone cannot fit; "data" would send the caller looking
    # at the wrong field.
    for field, part in (("key", key_size), ("headers", headers_size)):
        if part > limit:
            raise InvalidEventError(
                field,
                f"is {part} bytes encoded, over the limit of {limit} bytes for the whole event "
                "(OUTBOX_MAX_PAYLOAD_BYTES)",
            )
    size = len(payload) + key_size + headers_size
    if size > limit:
        raise PayloadTooLargeError(size, limit)
    values: dict[str, Any] = {
        "id": event.id,
        "topic": event.topic,
        "key": event.key,
        "type": event.type,
        "payload": payload,
        "content_type": event.content_type,
        "headers": event.headers,
        "created_at": event.time,
    }
    return event, values


def build_event(
    *,
    topic: str,
    key: str,
    type: str,
    data: Any,
    headers: Mapping[str, str] | None = None,
    event_id: uuid.UUID | str | None = None,
) -> Event:
    """Validate the fields of an event and return it; raises `InvalidEventError`."""
    _require_text("topic", topic)
    if not _TOPIC_NAME.fullmatch(topic) or topic in (".", ".."):
        raise InvalidEventError(
            "topic",
            f"{topic!r} is not a valid Kafka topic name: use 1-249 characters "
            "from a-z A-Z 0-9 . _ -",
        )
    _require_text("key", key)
    _require_text("type", type)
    return Event(
        id=_event_id(event_id),
        topic=topic,
        key=key,
        type=type,
        data=data,
        time=datetime.now(UTC),
        headers=_headers(headers),
        content_type=BYTES_CONTENT_TYPE if isinstance(data, bytes | bytearray) else JSON_CONTENT_TYPE,
    )


def encode_data(data: Any) -> bytes:
    """The bytes the relay will put in the Kafka message value."""
    if isinstance(data, bytes | bytearray):
        return bytes(data)
    try:
        text = _JSON.encode(data)
    except (TypeError, ValueError) as exc:
        raise InvalidEventError(
            "data",
            f"is not JSON-serialisable ({exc}); pass JSON types (dict, list, str, int, float, "
            "bool, None) or bytes, e.g. convert Decimal and datetime to str first",
        ) from None
    try:
        return text.encode()
    except UnicodeEncodeError as exc:
        raise InvalidEventError(
            "data",
            f"holds a string that is not valid Unicode (a lone surrogate {exc.object[exc.start]!r} "
            f"at position {exc.start} of the JSON); it cannot be encoded as UTF-8",
        ) from None


def _is_async(session: object, name: str) -> bool:
    # sqlalchemy.ext.asyncio needs greenlet; only look at it when the caller
    # could be using it, so sync-only applications need not install it.
    if not type(session).__module__.startswith("sqlalchemy.ext.asyncio"):
        return False
    from sqlalchemy.ext import asyncio

    return isinstance(session, getattr(asyncio, name))


def _require_text(field: str, value: object) -> None:
    if not isinstance(value, str):
        raise InvalidEventError(field, f"must be a str, got {type_name(value)}")
    if not value.strip():
        raise InvalidEventError(field, "must not be empty")
    _require_storable(field, value)


def _require_storable(field: str, value: str, what: str = "") -> None:
    """Refuse what PostgreSQL would refuse mid-transaction: NUL, and non-UTF-8 strings."""
    if "\x00" in value:
        raise InvalidEventError(
            field, f"{what}contains a NUL character (\\x00), which PostgreSQL cannot store in text"
        )
    try:
        value.encode()
    except UnicodeEncodeError as exc:
        raise InvalidEventError(
            field,
            f"{what}is not valid Unicode (a lone surrogate {exc.object[exc.start]!r} at position "
            f"{exc.start}); it cannot be encoded as UTF-8",
        ) from None


def _event_id(value: uuid.UUID | str | None) -> uuid.UUID:
    if value is None:
        return uuid.uuid4()
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise InvalidEventError("event_id", f"{value!r} is not a UUID") from None


def _headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    if headers is None:
        return {}
    if not isinstance(headers, Mapping):
        raise InvalidEventError("headers", f"must be a mapping of str to str, got {type_name(headers)}")
    result: dict[str, str] = {}
    for name, value in headers.items():
        if not isinstance(name, str) or not name:
            raise InvalidEventError("headers", f"header name {name!r} must be a non-empty str")
        if not isinstance(value, str):
            raise InvalidEventError("headers", f"header {name!r} value must be a str")
        _require_storable("headers", name, f"header name {name!r} ")
        _require_storable("headers", value, f"header {name!r} value ")
        lowered = name.lower()
        if lowered.startswith(RESERVED_HEADER_PREFIX) or lowered in RESERVED_HEADERS:
            raise InvalidEventError(
                "headers",
                f"header {name!r} is reserved for the CloudEvents envelope; choose another name",
            )
        result[name] = value
    return result


def _limit(max_payload_bytes: object) -> int:
    if max_payload_bytes is None:
        return env_int(MAX_PAYLOAD_BYTES_ENV, DEFAULT_MAX_PAYLOAD_BYTES, minimum=1)
    # bool is an int subclass: max_payload_bytes=True would mean a 1-byte limit.
    if not isinstance(max_payload_bytes, int) or isinstance(max_payload_bytes, bool):
        raise InvalidEventError(
            "max_payload_bytes", f"must be an int number of bytes, got {type_name(max_payload_bytes)}"
        )
    if max_payload_bytes < 1:
        raise InvalidEventError("max_payload_bytes", f"must be 1 or more, got {max_payload_bytes}")
    return max_payload_bytes


def type_name(value: object) -> str:
    return type(value).__name__


