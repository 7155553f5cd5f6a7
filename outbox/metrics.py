"""Every Prometheus metric of the kit, defined once, in the default registry.

The relay (relay/observer.py) and the consumer (outbox/consumer_observer.py)
write them; `outbox.endpoints` serves them with /livez and /readyz. Being in
`prometheus_client.REGISTRY`, they also appear on any /metrics a host
service already serves, with nothing to configure.

Labels are low-cardinality only: `topic`, `group` (the consumer group),
`partition`, `kind` (an error class or an outage kind). Never a key or an
event id: one series per payment would take Prometheus down.

Names follow the Prometheus conventions: `outbox_` prefix, `_total` for
counters (prometheus_client adds it), base units (seconds). The README lists
every metric with one line each; deploy/prometheus/outbox-rules.yml uses
them, and tests/unit/test_prometheus_rules.py checks it names only these.

This module must never do I/O or start a thread: importing it only defines.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

# Latencies from a commit to an acknowledgement or an effect: milliseconds
# when all is well, minutes in a backlog, hours when something is stuck.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
# A round or a batch transaction: a few ms to the publisher's delivery timeout.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)

# -- relay -----------------------------------------------------------------------

RELAY_PUBLISHED = Counter(
    "outbox_relay_published", "Events the broker acknowledged (acks=all), by topic.",
    ["topic"],
)
RELAY_PUBLISH_FAILURES = Counter(
    "outbox_relay_publish_failures",
    "Events the broker refused or did not acknowledge, by error kind (the error's class).",
    ["kind"],
)
RELAY_PARKED = Counter(
    "outbox_relay_parked", "Events moved to outbox_parked after max_attempts failed publishes.",
    ["topic"],
)
RELAY_BATCH_DURATION = Histogram(
    "outbox_relay_batch_duration_seconds",
    "One batch, from its fetch to the broker's outcome for each of its events; batches in the window overlap.",
    buckets=DURATION_BUCKETS,
)
RELAY_BATCH_SIZE = Histogram(
    "outbox_relay_batch_events", "Events fetched by one round that found any.", buckets=BATCH_BUCKETS,
)
RELAY_COMMIT_TO_ACK = Histogram(
    "outbox_relay_commit_to_ack_seconds",
    "From an event's time (set in its business transaction) to the broker's acknowledgement.",
    ["topic"], buckets=LATENCY_BUCKETS,
)
RELAY_SHARDS_OWNED = Gauge("outbox_relay_shards_owned", "Key shards this relay holds a lease on.")
RELAY_LEASES_LAPSED = Counter(
    "outbox_relay_leases_lapsed",
    "Shard leases this relay lost without giving them back (not renewed within their TTL).",
)
RELAY_LEASE_LOST_EVENTS = Counter(
    "outbox_relay_lease_lost_events",
    "Acknowledged events left to another relay because a lease lapsed during the round.",
)
RELAY_OUTAGE = Gauge(
    "outbox_relay_outage", "1 while the relay waits out an outage of this kind (broker, database).",
    ["kind"],
)
RELAY_OUTAGES = Counter("outbox_relay_outages", "Outages the relay waited out, by kind.", ["kind"])
RELAY_OUTAGE_SECONDS = Counter(
    "outbox_relay_outage_seconds", "Time spent waiting out outages, by kind.", ["kind"],
)
RELAY_READY = Gauge("outbox_relay_ready", "1 when /readyz answers 200: database and broker reachable.")
RELAY_HEARTBEAT = Gauge(
    "outbox_relay_heartbeat_timestamp_seconds", "Unix time the relay's main loop last made progress.",
)

# -- backlog: the seed's Q = n - m, computed by a relay every few seconds --------

BACKLOG_COMMITTED = Gauge("outbox_committed_events", "n: events whose transaction committed, ever.")
BACKLOG_PUBLISHED = Gauge("outbox_published_events", "m: events acknowledged by the broker, ever.")
BACKLOG = Gauge("outbox_backlog_events", "Q = n - m: committed, not yet published (parked included).")
BACKLOG_OLDEST_AGE = Gauge(
    "outbox_oldest_unpublished_age_seconds",
    "Age of the oldest event still waiting in the outbox; 0 when it is empty.",
)
BACKLOG_PARKED = Gauge("outbox_parked_events", "Events in outbox_parked now (see `outbox parked list`).")
BACKLOG_UNNUMBERED = Gauge(
    "outbox_unnumbered_events",
    "Committed events without a position: the commit trigger is broken; never published.",
)

# -- consumer --------------------------------------------------------------------

CONSUMER_APPLIED = Counter(
    "outbox_consumer_applied", "Messages whose handler ran and whose transaction committed.",
    ["group", "topic"],
)
CONSUMER_DUPLICATES = Counter(
    "outbox_consumer_duplicates", "Messages skipped: their event id was already in the inbox.",
    ["group", "topic"],
)
CONSUMER_DEAD_LETTERED = Counter(
    "outbox_consumer_dead_lettered", "Messages parked in outbox_dead_letter.", ["group", "topic"],
)
CONSUMER_RETRIES = Counter(
    "outbox_consumer_handler_retries", "Handler attempts that failed and were retried.",
    ["group", "topic"],
)
CONSUMER_HANDLER_DURATION = Histogram(
    "outbox_consumer_handler_duration_seconds", "One handler call, successful or not.",
    ["group", "topic"], buckets=DURATION_BUCKETS,
)
CONSUMER_BATCH_DURATION = Histogram(
    "outbox_consumer_batch_transaction_seconds",
    "One batch transaction: inbox claim, handlers, commit.", ["group"], buckets=DURATION_BUCKETS,
)
CONSUMER_COMMIT_TO_EFFECT = Histogram(
    "outbox_consumer_commit_to_effect_seconds",
    "From an event's time (its business transaction) to the commit of its effect.",
    ["group", "topic"], buckets=LATENCY_BUCKETS,
)
CONSUMER_LAG = Gauge(
    "outbox_consumer_lag_messages",
    "Messages in a partition after the last one handled (broker's high watermark minus position).",
    ["group", "topic", "partition"],
)
CONSUMER_DATABASE_WAITS = Counter(
    "outbox_consumer_database_waits", "Backoffs because the database did not answer.", ["group"],
)
CONSUMER_READY = Gauge(
    "outbox_consumer_ready", "1 when /readyz answers 200: in its group, database reachable.",
    ["group"],
)
CONSUMER_HEARTBEAT = Gauge(
    "outbox_consumer_heartbeat_timestamp_seconds",
    "Unix time the consumer's loop last made progress.", ["group"],
)

_KIND = re.compile(r"[^A-Za-z0-9_]+")


def error_kind(error: str | None) -> str:
    """A label value for an error line: its class name ("KafkaTimeoutError: ..."), else "other".

    Bounded by the set of error classes, so it is safe as a label; the text
    after the colon (topic names, sizes, ids) never becomes one.
    """
    head = (error or "").split(":", 1)[0].strip()
    kind = _KIND.sub("_", head).strip("_")
    if not kind or len(kind) > 60 or (" " in head.strip() and not head.startswith("KafkaError")):
        return "other"
    return kind


def observe_many(histogram: Any, values: Sequence[float]) -> None:
    """`histogram.observe(v)` for every v, at the cost of one update per bucket, not per value.

    The relay observes the commit-to-ack latency of every event it
    publishes; at 2 us an observe, a 500-event round would spend a
    millisecond on it. This counts the values into buckets with bisect and
    adds each bucket's count and the sum once. It reaches into
    prometheus_client's histogram child (`_upper_bounds`, `_buckets`,
    `_sum`); should those change, it falls back to one observe per value
    (tests/unit/test_metrics.py checks both give the same samples).
    """
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for value in values:
            histogram.observe(value)
        return
    counts = [0] * len(bounds)
    for value in values:
        counts[min(bisect.bisect_left(bounds, value), len(bounds) - 1)] += 1
    for bucket, count in zip(buckets, counts, strict=True):
        if count:
            bucket.inc(count)
    total.inc(sum(values))
