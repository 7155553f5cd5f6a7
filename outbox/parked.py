"""Events the relay parked: list them, and put them back in line.

Replaying moves a parked event back into `outbox_event` with its original
id, type, data and headers. It gets a new position at the commit of the
replaying transaction, so it is published *after* every event of its key
that was committed before the replay: the key's order is broken exactly
where the event was parked, and nowhere else. Consumers see the event id
they would have seen; the inbox makes a second delivery harmless.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, delete, insert, select

from outbox.errors import ParkedEventError
from outbox.schema import outbox_event, outbox_parked


@dataclass(frozen=True, slots=True)
class ParkedEvent:
    id: uuid.UUID
    topic: str
    key: str
    type: str
    attempts: int
    error: str
    parked_at: datetime
    size: int


def list_parked(conn: Connection, *, limit: int = 100) -> list[ParkedEvent]:
    rows = conn.execute(
        select(
            outbox_parked.c.id, outbox_parked.c.topic, outbox_parked.c.key,
            outbox_parked.c.type, outbox_parked.c.attempts, outbox_parked.c.error,
            outbox_parked.c.parked_at, outbox_parked.c.payload,
        ).order_by(outbox_parked.c.parked_at).limit(limit)
    ).all()
    return [
        ParkedEvent(r.id, r.topic, r.key, r.type, r.attempts, r.error, r.parked_at, len(r.payload))
        for r in rows
    ]


def replay_parked(conn: Connection, ids: Sequence[uuid.UUID] | None = None) -> int:
    """Move parked events (all of them if `ids` is None) back to the outbox.

    Runs in the caller's transaction; nothing is replayed unless it commits.
    Raises `ParkedEventError` if any requested id is not parked.
    """
    columns = ["id", "topic", "key", "type", "payload", "content_type", "headers", "created_at"]
    moved = delete(outbox_parked).returning(*(outbox_parked.c[c] for c in columns))
    if ids is not None:
        wanted = set(ids)
        moved = moved.where(outbox_parked.c.id.in_(wanted))
    rows = conn.execute(moved).all()
    if ids is not None and len(rows) != len(set(ids)):
        missing = sorted(str(i) for i in set(ids) - {r.id for r in rows})
        raise ParkedEventError(
            f"not parked: {', '.join(missing)}; see `outbox parked list` for parked events"
        )
    if rows:
        conn.execute(insert(outbox_event), [dict(zip(columns, row, strict=True)) for row in rows])
    return len(rows)
