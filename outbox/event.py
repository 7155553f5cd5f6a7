"""`Event`: what `publish` wrote, and what a consumer's handler receives."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

JSON_CONTENT_TYPE = "application/json"
BYTES_CONTENT_TYPE = "application/octet-stream"


@dataclass(frozen=True, kw_only=True, slots=True)
class Event:
    """One event. `data` is the decoded JSON value, or `bytes` for binary events.

    On the consuming side `topic`, `partition` and `offset` say where the
    message was read; on the writing side `partition` and `offset` are None.
    """

    id: uuid.UUID
    topic: str
    key: str
    type: str
    data: Any
    time: datetime
    headers: Mapping[str, str] = field(default_factory=dict)
    content_type: str = JSON_CONTENT_TYPE
    source: str | None = None
    partition: int | None = None
    offset: int | None = None


def decode_data(payload: bytes, content_type: str) -> Any:
    """The payload as the handler sees it: JSON decoded, anything else as bytes."""
    if content_type.split(";")[0].strip() == JSON_CONTENT_TYPE:
        return json.loads(payload)
    return payload
