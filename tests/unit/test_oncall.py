"""The on-call view's arithmetic and rendering (`outbox stats`), without a database."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

from outbox.lag import GroupLag
from outbox.oncall import CLEAR, OnCallView, as_json, as_text, watch
from outbox.stats import OutboxStats, PublishRate, TopicBacklog, drain_time

NOW = datetime(2026, 12, 1, 19, 0, tzinfo=UTC)


def view(*, waiting: int = 30, published_last_minute: int = 60) -> OnCallView:
    stats = OutboxStats(committed=100 + waiting + 2, published=100, parked=2, unnumbered=0,
                        oldest_unpublished=NOW - timedelta(seconds=90), now=NOW)
    rate = PublishRate(published_last_minute, 60.0)
    return OnCallView(
        stats, [TopicBacklog("payments", waiting, 2, NOW - timedelta(seconds=90))], rate,
        drain_time(waiting, rate), [GroupLag("ledger", {("payments", 0): 3, ("payments", 1): 4})],
    )


def test_drain_time_is_backlog_times_the_time_per_event() -> None:
    assert drain_time(30, PublishRate(60, 60.0)) == 30.0  # 1 event/s: P = 1 s
    assert drain_time(0, PublishRate(0, 60.0)) == 0.0
    assert drain_time(5, PublishRate(0, 60.0)) is None  # stalled


def test_json_view_counts_parked_in_q_but_not_in_the_drain() -> None:
    shown = as_json(view())
    assert (shown["backlog"], shown["waiting"], shown["parked"]) == (32, 30, 2)
    assert shown["drain_seconds"] == 30.0 and shown["stalled"] is False
    assert shown["oldest_unpublished_age_seconds"] == 90.0
    assert shown["consumer_lag"][0] == {
        "group": "ledger", "lag": 7, "topics": {"payments": 7},
        "partitions": [{"topic": "payments", "partition": 0, "lag": 3},
                       {"topic": "payments", "partition": 1, "lag": 4}],
    }


def test_text_view_says_stalled_and_keeps_one_value_per_line() -> None:
    text = as_text(view(published_last_minute=0))
    assert "stalled" in text
    lines = dict(line.rsplit(None, 1) for line in text.splitlines())  # what scripts parse
    assert lines["backlog (Q = n - m)"] == "32"
    assert lines["oldest unpublished"] == "90.0s"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_watch_redraws_in_place_on_a_terminal_and_appends_otherwise() -> None:
    sleeps: list[float] = []
    screen = _Terminal()
    watch(view, interval=2.0, out=screen, sleep=sleeps.append, rounds=3)
    assert screen.getvalue().count(CLEAR) == 3 and sleeps == [2.0, 2.0]
    log = io.StringIO()
    watch(view, interval=2.0, out=log, sleep=sleeps.append, rounds=2)
    assert CLEAR not in log.getvalue() and log.getvalue().count("committed (n)") == 2
