"""CloudEvents 1.0 over Kafka, binary content mode: the kit's wire format.

A message's key is the event key (UTF-8), its value is the event data as
stored by `publish` (JSON, or raw bytes), and its headers carry the
attributes: `ce_specversion`, `ce_id`, `ce_source`, `ce_type`, `ce_time`,
`content-type`, then the user's own headers. Any CloudEvents SDK, in any
language, reads these messages; `decode` is the kit's own reader.

`decode` refuses (`MalformedMessageError`, which the consumer dead-letters
at once) what the kit's `publish` could never have written, so a message a
handler receives always looks like an event `publish` accepted: no key or an
empty one, JSON data with NaN or Infinity (`publish` encodes with
allow_nan=False; PostgreSQL's jsonb and most other JSON readers refuse them),
JSON data that is not UTF-8, headers that are not UTF-8, a missing id, type
or source. Content types other than JSON are passed on as bytes, since other
CloudEvents producers may write them.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, NoReturn

from outbox.errors import MalformedMessageError
from outbox.event import JSON_CONTENT_TYPE, Event, decode_data

SPEC_VERSION = "1.0"
Headers = list[tuple[str, bytes]]


def encode_headers(
    *,
    event_id: uuid.UUID,
    type: str,
    source: str,
    time: datetime,
    content_type: str,
    headers: Mapping[str, str],
) -> Headers:
    """The Kafka headers of one event, CloudEvents attributes first."""
    return HeaderEncoder(source).encode(
        str(event_id), type, format_time(time), content_type, headers
    )


class HeaderEncoder:
    """`encode_headers` for one source, for the relay's per-event loop.

    The attributes every event of a relay shares are encoded once; the id
    and the time arrive as text (PostgreSQL formats them, see
    relay/store.py), so no UUID or datetime object is made per event.
    """

    __slots__ = ("_source", "_specversion")

    def __init__(self, source: str) -> None:
        # Tuples are immutable, so every message can share these two.
        self._specversion = ("ce_specversion", SPEC_VERSION.encode())
        self._source = ("ce_source", source.encode())

    def encode(
        self, event_id: str, type: str, time: str, content_type: str, headers: Mapping[str, str]
    ) -> Headers:
        """`time` as `format_time` writes it; `event_id` in the canonical UUID form."""
        encoded: Headers = [
            self._specversion,
            ("ce_id", event_id.encode()),
            self._source,
            ("ce_type", type.encode()),
            ("ce_time", time.encode()),
            ("content-type", content_type.encode()),
        ]
        for name, value in headers.items():
            encoded.append((name, value.encode()))
        return encoded


def format_time(time: datetime) -> str:
    """RFC 3339 in UTC, always with microseconds, as CloudEvents asks.

    Always six digits (isoformat would drop them at .000000), so this and
    the relay's SQL formatting (relay/store.py) agree to the character.
    """
    return time.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def decode(
    *,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    headers: Iterable[tuple[str, bytes]] | None,
) -> Event:
    """Read one Kafka message as an `Event`; raises `MalformedMessageError`."""
    attributes: dict[str, str] = {}
    user_headers: dict[str, str] = {}
    for name, raw in headers or ():
        try:
            text = raw.decode() if raw is not None else ""
        except UnicodeDecodeError:
            raise MalformedMessageError(f"header {name!r} is not UTF-8") from None
        if name.startswith("ce_") or name == "content-type":
            attributes[name] = text
        else:
            user_headers[name] = text
    if attributes.get("ce_specversion") != SPEC_VERSION:
        raise MalformedMessageError(
            f"not a CloudEvents {SPEC_VERSION} binary-mode message "
            f"(ce_specversion={attributes.get('ce_specversion')!r})"
        )
    missing = [h for h in ("ce_id", "ce_type", "ce_source") if not attributes.get(h)]
    if missing:
        raise MalformedMessageError(f"missing required attribute(s): {', '.join(missing)}")
    try:
        event_id = uuid.UUID(attributes["ce_id"])
    except ValueError:
        raise MalformedMessageError(f"ce_id {attributes['ce_id']!r} is not a UUID") from None
    content_type = attributes.get("content-type", JSON_CONTENT_TYPE)
    try:
        data: Any = _decode_data(value or b"", content_type)
    except ValueError as exc:
        raise MalformedMessageError(f"data is not valid {content_type}: {exc}") from None
    if key is None:
        raise MalformedMessageError("message has no key; publish always sets the event key")
    try:
        text_key = key.decode()
    except UnicodeDecodeError:
        raise MalformedMessageError("message key is not UTF-8") from None
    if not text_key.strip():
        raise MalformedMessageError("message key is empty; publish refuses an empty event key")
    return Event(
        id=event_id,
        topic=topic,
        key=text_key,
        type=attributes["ce_type"],
        data=data,
        time=_parse_time(attributes.get("ce_time")),
        headers=user_headers,
        content_type=content_type,
        source=attributes["ce_source"],
        partition=partition,
        offset=offset,
    )


HEX_PREFIX = "hex:"


def text_or_hex(raw: bytes | None) -> str | None:
    """Bytes as their UTF-8 text, else `hex:` and their hex digits.

    The kit's one way to write bytes where only text fits: a JSONB column
    (dead-letter headers) or a JSON line (`outbox dead-letters list`). Text
    holding a NUL is written as hex too, since JSONB refuses \\u0000.
    `bytes_from_text_or_hex` reverses it.
    """
    if raw is None:
        return None
    try:
        text = bytes(raw).decode()
    except UnicodeDecodeError:
        return HEX_PREFIX + bytes(raw).hex()
    return HEX_PREFIX + bytes(raw).hex() if "\x00" in text else text


def bytes_from_text_or_hex(value: str) -> bytes:
    """The bytes `text_or_hex` wrote `value` for."""
    if value.startswith(HEX_PREFIX):
        with contextlib.suppress(ValueError):
            return bytes.fromhex(value[len(HEX_PREFIX):])
    return value.encode()


def headers_as_json(headers: Sequence[tuple[str, bytes]] | None) -> dict[str, str]:
    """Headers in a form a JSONB column can hold: values by `text_or_hex`, a NUL in a name escaped."""
    return {
        name.replace("\x00", "\\x00"): text_or_hex(bytes(raw or b"")) or ""
        for name, raw in headers or ()
    }


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number (publish refuses NaN and Infinity)")


# json.loads accepts NaN, Infinity and -Infinity, and bytes in UTF-16 or UTF-32.
_STRICT_JSON = json.JSONDecoder(parse_constant=_refuse_constant)


def _decode_data(payload: bytes, content_type: str) -> Any:
    if content_type.split(";")[0].strip() == JSON_CONTENT_TYPE:
        return _STRICT_JSON.decode(payload.decode("utf-8"))  # UnicodeDecodeError is a ValueError
    return decode_data(payload, content_type)


def _parse_time(value: str | None) -> datetime:
    if not value:
        return datetime.now(UTC)
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise MalformedMessageError(f"ce_time {value!r} is not RFC 3339") from None
