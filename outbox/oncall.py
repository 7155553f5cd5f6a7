"""`outbox stats`: the on-call view of the outbox, once, as JSON, or refreshed in place.

What an engineer paged at night asks first, on one screen: how big the
backlog is (the seed's Q = n - m), how old its oldest event is, which topic
it sits in, whether the relay publishes at all (the rate over the last
minute), how long the backlog takes to drain at that rate (T = Q x P, or
"stalled"), and, given `--bootstrap-servers`, which consumer group is
behind. The numbers come from `outbox.stats` and `outbox.lag`; this module
only gathers and shows them.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TextIO

from sqlalchemy import Engine

from outbox.errors import describe_error
from outbox.lag import GroupLag, consumer_lag
from outbox.stats import (
    OutboxStats,
    PublishRate,
    TopicBacklog,
    drain_time,
    outbox_stats,
    publish_rate,
    topic_backlog,
)

CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen: a refresh in place, as watch(1) does


@dataclass(frozen=True, slots=True)
class OnCallView:
    stats: OutboxStats
    topics: list[TopicBacklog]
    rate: PublishRate
    drain_seconds: float | None  # T = Q x P; None: stalled
    lag: list[GroupLag] | None  # None: no --bootstrap-servers
    lag_error: str | None = None  # why the lag could not be read

    @property
    def waiting(self) -> int:
        return self.stats.backlog - self.stats.parked


def gather(
    engine: Engine, *, bootstrap_servers: str | None = None, groups: Sequence[str] | None = None,
    kafka_settings: Mapping[str, Any] | None = None,
) -> OnCallView:
    with engine.connect() as conn:
        stats = outbox_stats(conn)
        topics = topic_backlog(conn)
        rate = publish_rate(conn, stats.now)
    lag: list[GroupLag] | None = None
    lag_error = None
    if bootstrap_servers:
        try:
            lag = consumer_lag(bootstrap_servers, groups, kafka_settings)
        except Exception as exc:  # the database half is still worth showing
            lag, lag_error = [], f"cannot read consumer lag from {bootstrap_servers}: {describe_error(exc)}"
    return OnCallView(stats, topics, rate, drain_time(stats.backlog - stats.parked, rate), lag, lag_error)


def as_json(view: OnCallView) -> dict[str, Any]:
    s = view.stats
    return {
        "committed": s.committed,
        "published": s.published,
        "backlog": s.backlog,
        "waiting": view.waiting,
        "parked": s.parked,
        "unnumbered": s.unnumbered,
        "oldest_unpublished_age_seconds": _seconds(s.oldest_age),
        "publish_rate_per_second": round(view.rate.per_second, 3),
        "published_last_minute": view.rate.published,
        "drain_seconds": None if view.drain_seconds is None else round(view.drain_seconds, 1),
        "stalled": view.drain_seconds is None,
        "topics": [
            {"topic": t.topic, "waiting": t.waiting, "parked": t.parked,
             "oldest_unpublished_age_seconds": _seconds(s.now - t.oldest_unpublished)
             if t.oldest_unpublished else None}
            for t in view.topics
        ],
        "consumer_lag": None if view.lag is None else [
            {"group": g.group, "lag": g.total, "topics": g.by_topic(),
             "partitions": [{"topic": t, "partition": p, "lag": n}
                            for (t, p), n in sorted(g.partitions.items())]}
            for g in view.lag
        ],
        "consumer_lag_error": view.lag_error,
        "at": s.now.isoformat(),
    }


def as_text(view: OnCallView) -> str:
    s = view.stats
    drain = ("stalled: events wait and nothing was published in the last minute"
             if view.drain_seconds is None else _duration(view.drain_seconds))
    lines = [
        f"committed (n)         {s.committed}",
        f"published (m)         {s.published}",
        f"backlog (Q = n - m)   {s.backlog}",
        f"oldest unpublished    {_age(s.oldest_age)}",
        f"parked                {s.parked}",
        f"not yet numbered      {s.unnumbered}",
        f"publish rate          {view.rate.per_second:.1f}/s ({view.rate.published} in the last minute)",
        f"drain time (T = Q x P) {drain}",
    ]
    if view.topics:
        lines.append(f"{'  topic':<32} {'waiting':>9} {'parked':>7}  oldest")
        lines += [
            f"  {t.topic:<30} {t.waiting:>9} {t.parked:>7}  "
            f"{_age(s.now - t.oldest_unpublished if t.oldest_unpublished else None)}"
            for t in view.topics
        ]
    if view.lag_error:
        lines.append(f"consumer lag: {view.lag_error}")
    elif view.lag is not None:
        lines.append(f"{'  consumer group':<32} {'lag':>9}  by topic")
        lines += [
            f"  {g.group:<30} {g.total:>9}  "
            + (", ".join(f"{topic}={n}" for topic, n in g.by_topic().items()) or "(no offsets)")
            for g in view.lag
        ]
        if not view.lag:
            lines.append("  consumer groups: none with committed offsets")
    return "\n".join(lines)


def watch(
    read: Callable[[], OnCallView], *, interval: float, render: Callable[[OnCallView], str] = as_text,
    out: TextIO = sys.stdout, sleep: Callable[[float], object] = time.sleep,
    rounds: int | None = None,
) -> None:
    """Show `read()` every `interval` seconds, in place on a terminal (appended otherwise), until
    Ctrl-C (or `rounds` refreshes, for tests)."""
    in_place = out.isatty()
    shown = 0
    while rounds is None or shown < rounds:
        text = render(read())
        out.write((CLEAR if in_place else "") + text + "\n")
        if not in_place:
            out.write("\n")
        out.flush()
        shown += 1
        if rounds is None or shown < rounds:
            sleep(interval)


def _seconds(age: timedelta | None) -> float | None:
    return None if age is None else round(age.total_seconds(), 3)


def _age(age: timedelta | None) -> str:
    return f"{age.total_seconds():.1f}s" if age is not None else "-"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}min"
    return f"{seconds / 3600:.1f}h"


def dumps(view: OnCallView) -> str:
    return json.dumps(as_json(view))
