"""The inbox: which events a consumer group has applied, the SQL that decides it, and its retention.

    claim(session, group, events)                  one INSERT for a batch; returns the ids new to group
    apply_event(session, group=, event=, handler=) claim one event and run its handler (no commit)
    unclaim_events(session, group, ids)            delete inbox rows again (the repair after
                                                   TransactionEndedError; a batch cut short)
    purge_inbox(engine_or_conn, older_than=...)    forget old rows, in short batches

The unique key (consumer group, event id) decides races: when two members of
a group meet the same event, the second INSERT waits for the first
transaction and then returns nothing, so the loser skips the handler.
Nothing here commits: the caller's COMMIT makes an inbox row and the
handler's effects durable together.

Retention: the inbox deduplicates only what it remembers. Keep rows longer
than the topic's `retention.ms` plus the longest time a message may wait
unconsumed (consumer lag, an outage, a paused group); a message read again
after its inbox row was purged would be applied twice. For example with
7-day topic retention and at most 3 days of tolerated lag, purge with
`older_than=timedelta(days=10)` or more.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta

from sqlalchemy import Connection, Engine, delete, func, select, text, tuple_
from sqlalchemy.orm import Session

from outbox.errors import ConfigError, MalformedMessageError
from outbox.event import Event
from outbox.handler import Handler, HandlerGuard
from outbox.preflight import kit_statement
from outbox.schema import outbox_inbox

__all__ = ["apply_event", "claim", "purge_inbox", "unclaim_events"]

# One statement claims a whole batch (one round trip), rows in the batch's order.
_CLAIM = text(f"""
    INSERT INTO {outbox_inbox.name} (consumer_group, event_id, topic, partition, "offset")
    SELECT :group, m.event_id, m.topic, m.partition, m."offset"
    FROM unnest(CAST(:event_ids AS uuid[]), CAST(:topics AS text[]),
                CAST(:partitions AS integer[]), CAST(:offsets AS bigint[]))
         WITH ORDINALITY AS m(event_id, topic, partition, "offset", n)
    ORDER BY m.n
    ON CONFLICT (consumer_group, event_id) DO NOTHING
    RETURNING event_id
""")
_UNCLAIM = text(
    f"DELETE FROM {outbox_inbox.name} "
    "WHERE consumer_group = :group AND event_id = ANY(CAST(:event_ids AS uuid[])) "
    "RETURNING event_id"
)


def claim(session: Session, group: str, events: Sequence[Event]) -> set[uuid.UUID]:
    """Insert the events' inbox rows in one statement; returns the ids that were new to `group`.

    An id the group already has (committed, or claimed by a transaction that
    then commits: the INSERT waits for it) is not returned, nor is the second
    copy of an id that appears twice in `events`.
    """
    if not events:
        return set()
    with kit_statement(f"inserting rows into {outbox_inbox.name}"):
        rows = session.execute(_CLAIM, {
            "group": group,
            "event_ids": [e.id for e in events],
            "topics": [e.topic for e in events],
            "partitions": [e.partition for e in events],
            "offsets": [e.offset for e in events],
        })
    return set(rows.scalars())


def apply_event(session: Session, *, group: str, event: Event, handler: Handler) -> bool:
    """Record `event` in `group`'s inbox and run `handler`, inside `session`'s transaction.

    Returns False, without running the handler, when the group already has
    the event. Nothing is committed here: the caller's commit makes the inbox
    row and the handler's effects durable together, and a rollback discards
    both, so the event can be applied again. The handler is held to the
    handler contract (`outbox.handler`): what it may not do raises
    `HandlerContractError`, and the caller must then roll back. After
    `TransactionEndedError` the inbox row may have been committed: delete it
    again (`unclaim_events`) before the event is retried. Dead-letter replay
    and the consumer's one-message path go through this function; its
    batches claim with the same statement (`claim`).
    """
    if event.partition is None or event.offset is None:
        raise MalformedMessageError(
            f"event {event.id} has no partition/offset; only consumed events can be applied"
        )
    if event.id not in claim(session, group, [event]):
        return False
    HandlerGuard.for_session(session).run(handler, event)
    return True


def unclaim_events(session: Session, group: str, event_ids: Iterable[uuid.UUID]) -> set[uuid.UUID]:
    """Delete `group`'s inbox rows of `event_ids`; returns the ids that had a row.

    The repair after `TransactionEndedError`: rows that a handler's commit
    made durable without the effects of their events.
    """
    ids = list(event_ids)
    if not ids:
        return set()
    with kit_statement("deleting inbox rows"):
        rows = session.execute(_UNCLAIM, {"group": group, "event_ids": ids})
    return set(rows.scalars())


def purge_inbox(
    conn: Engine | Connection,
    *,
    older_than: timedelta,
    group: str | None = None,
    batch_size: int = 10_000,
    now: datetime | None = None,
) -> int:
    """Delete inbox rows processed more than `older_than` ago; returns how many.

    Read the retention rule in this module's docstring first: purging too
    early lets a redelivered message be applied twice.

    Deletes in batches of `batch_size`. Given an `Engine`, each batch is its
    own short transaction, so a large purge never holds locks for long. Given
    a `Connection`, the batches run inside the caller's transaction and
    nothing is committed here. `now` defaults to the database's clock.
    """
    if older_than <= timedelta(0):
        raise ConfigError("older_than", f"must be a positive duration, got {older_than}")
    if batch_size < 1:
        raise ConfigError("batch_size", f"must be 1 or more, got {batch_size}")
    if isinstance(conn, Engine):
        with conn.connect() as c:
            cutoff = _cutoff(c, now, older_than)
        total = 0
        while True:
            with conn.begin() as c:
                deleted = _delete_batch(c, cutoff, group, batch_size)
            total += deleted
            if deleted < batch_size:
                return total
    cutoff = _cutoff(conn, now, older_than)
    total = 0
    while True:
        deleted = _delete_batch(conn, cutoff, group, batch_size)
        total += deleted
        if deleted < batch_size:
            return total


def _cutoff(conn: Connection, now: datetime | None, older_than: timedelta) -> datetime:
    if now is None:
        now = conn.execute(select(func.now())).scalar_one()
    return now - older_than


def _delete_batch(conn: Connection, cutoff: datetime, group: str | None, batch_size: int) -> int:
    t = outbox_inbox
    victims = select(t.c.consumer_group, t.c.event_id).where(t.c.processed_at < cutoff)
    if group is not None:
        victims = victims.where(t.c.consumer_group == group)
    result = conn.execute(
        delete(t).where(
            tuple_(t.c.consumer_group, t.c.event_id).in_(victims.limit(batch_size))
        )
    )
    return int(result.rowcount)
