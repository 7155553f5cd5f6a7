"""`outbox stats`: how far behind the relay is.

The backlog is Q = n - m (events committed minus events published), the
formula of the article this kit started from. m is a counter the relay
increments in the same transaction that deletes published rows, so it is
exact; n is m plus the rows still waiting plus the parked ones.

"Waiting" includes rows that have no `position`. Another session never sees
an uncommitted row, and the commit trigger numbers every row before its
transaction's commit becomes visible, so a row this query sees with
`position` NULL was committed without the trigger (missing, disabled or
replaced). The relay never publishes such a row; it is counted in n and Q,
and separately as `unnumbered`, so a stuck backlog can never read as zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, func, select

from outbox.schema import PUBLISHED_COUNTER, outbox_counter, outbox_event, outbox_parked


@dataclass(frozen=True, slots=True)
class OutboxStats:
    committed: int  # n: every event whose transaction committed
    published: int  # m: acknowledged by the broker
    parked: int  # given up on by the relay; see `outbox parked list`
    unnumbered: int  # committed without a position: the commit trigger is broken
    oldest_unpublished: datetime | None
    now: datetime

    @property
    def backlog(self) -> int:
        """Q = n - m: committed but not yet published (parked events included)."""
        return self.committed - self.published

    @property
    def oldest_age(self) -> timedelta | None:
        return self.now - self.oldest_unpublished if self.oldest_unpublished else None


def outbox_stats(conn: Connection) -> OutboxStats:
    waiting, unnumbered, oldest = conn.execute(
        select(
            func.count(),
            func.count().filter(outbox_event.c.position.is_(None)),
            func.min(outbox_event.c.created_at),
        )
    ).one()
    parked = conn.execute(select(func.count()).select_from(outbox_parked)).scalar_one()
    published = conn.execute(
        select(outbox_counter.c.value).where(outbox_counter.c.name == PUBLISHED_COUNTER)
    ).scalar_one_or_none() or 0
    now = conn.execute(select(func.now())).scalar_one()
    return OutboxStats(
        committed=published + waiting + parked,
        published=published,
        parked=parked,
        unnumbered=unnumbered,
        oldest_unpublished=oldest,
        now=now,
    )
