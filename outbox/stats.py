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

The publishing rate comes from counters the relay keeps anyway: besides m it
counts m per 10 s (`published@<time>` rows of outbox_counter, in the same
statement that deletes published rows), so the rate over the last minute is
exact and costs `outbox stats` one indexed read. The drain time is the seed's
T = Q x P with P = 1 / rate; Q here counts the events still waiting (parked
ones wait for a person, not for the relay), and it is "stalled" (None) when
events wait but nothing was published in the last minute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, func, select

from outbox.schema import (
    PUBLISHED_BUCKET_PREFIX,
    PUBLISHED_COUNTER,
    RATE_BUCKET_SECONDS,
    outbox_counter,
    outbox_event,
    outbox_parked,
)

RATE_WINDOW_SECONDS = 60


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


@dataclass(frozen=True, slots=True)
class TopicBacklog:
    topic: str
    waiting: int  # in outbox_event: committed, not yet acknowledged
    parked: int
    oldest_unpublished: datetime | None


def topic_backlog(conn: Connection) -> list[TopicBacklog]:
    """The backlog per topic, by topic name."""
    waiting = {
        topic: (count, oldest)
        for topic, count, oldest in conn.execute(
            select(outbox_event.c.topic, func.count(), func.min(outbox_event.c.created_at))
            .group_by(outbox_event.c.topic)
        )
    }
    parked: dict[str, int] = {
        topic: count
        for topic, count in conn.execute(
            select(outbox_parked.c.topic, func.count()).group_by(outbox_parked.c.topic)
        )
    }
    return [
        TopicBacklog(topic, waiting.get(topic, (0, None))[0], parked.get(topic, 0),
                     waiting.get(topic, (0, None))[1])
        for topic in sorted(set(waiting) | set(parked))
    ]


@dataclass(frozen=True, slots=True)
class PublishRate:
    published: int  # events acknowledged in the window
    seconds: float  # the window: the last complete minute of 10 s buckets

    @property
    def per_second(self) -> float:
        return self.published / self.seconds


def publish_rate(conn: Connection, now: datetime) -> PublishRate:
    """Events published in the last minute, from the relay's 10 s counters.

    The bucket still filling is left out, so the window is the six buckets
    before it: the last minute, up to 10 s ago.
    """
    current = math.floor(now.timestamp() / RATE_BUCKET_SECONDS) * RATE_BUCKET_SECONDS
    names = [
        f"{PUBLISHED_BUCKET_PREFIX}{current - RATE_BUCKET_SECONDS * i}"
        for i in range(1, RATE_WINDOW_SECONDS // RATE_BUCKET_SECONDS + 1)
    ]
    published = conn.execute(
        select(func.coalesce(func.sum(outbox_counter.c.value), 0)).where(outbox_counter.c.name.in_(names))
    ).scalar_one()
    return PublishRate(int(published), float(RATE_WINDOW_SECONDS))


def drain_time(waiting: int, rate: PublishRate) -> float | None:
    """T = Q x P in seconds (P = 1 / rate): 0 when nothing waits, None when stalled."""
    if waiting == 0:
        return 0.0
    if rate.published == 0:
        return None
    return waiting / rate.per_second
