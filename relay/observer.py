"""What the relay loop tells the outside: metrics, health, and the backlog gauges.

The loop calls a handful of one-line hooks (`round_started`, `round`,
`parked`, `failing`, `recovered`, ...); everything else lives here, so the
loop does not grow a line per signal. The counters and histograms are
always kept (cheap, and in the default registry for whoever serves it).

With `metrics_port` set, `start()` also serves /metrics, /livez and /readyz
(outbox/endpoints.py) and runs one probe thread which, every few seconds:
computes the backlog gauges from the seed's formula (`outbox.stats`: n, m,
Q = n - m, the oldest unpublished event's age, parked), which doubles as
the database probe; asks the broker for its metadata (`BrokerProbe`, its own
client, never the loop's producer); and notes the shards this relay owns.
One query every few seconds, not one per round: a relay publishing 500
rounds a second pays nothing for its gauges.

Never raises into the loop, never blocks it on I/O.
"""

from __future__ import annotations

import logging
import time
from collections import Counter as Tally
from collections.abc import Sequence
from datetime import datetime

import psycopg
from sqlalchemy import Engine, create_engine
from sqlalchemy.pool import NullPool

from outbox import metrics, tracing
from outbox.endpoints import Endpoints, serve
from outbox.errors import ConfigError, first_line
from outbox.health import PROBE_INTERVAL, BrokerProbe, Health, Ticker, database_problem
from outbox.stats import outbox_stats
from relay.config import RelayConfig
from relay.leases import ShardLeases
from relay.publisher import Delivery
from relay.store import Row

log = logging.getLogger("relay.relay")


class RelayObserver:
    def __init__(self, config: RelayConfig, leases: ShardLeases) -> None:
        self.config = config
        self.health = Health(liveness_timeout=config.liveness_timeout)
        self._leases = leases
        self._outage: str | None = None  # kind of the outage being waited out
        self._started = False  # the start checks passed once
        self._outage_counted_at = 0.0
        self._owned = 0
        self._endpoints: Endpoints | None = None
        self._ticker: Ticker | None = None
        self._engine: Engine | None = None
        self._broker: BrokerProbe | None = None
        for kind in ("broker", "database"):  # present at 0 from the first scrape, for rate()
            metrics.RELAY_OUTAGE.labels(kind).set(0)
            metrics.RELAY_OUTAGES.labels(kind)
            metrics.RELAY_OUTAGE_SECONDS.labels(kind)

    # -- hooks the loop calls ---------------------------------------------------

    def beat(self) -> None:
        self.health.beat()
        metrics.RELAY_HEARTBEAT.set(time.time())

    def round_started(self) -> None:
        self.beat()

    def batch(self, rows: Sequence[Row], deliveries: Sequence[Delivery], *, fetched_at: float) -> None:
        """A batch of `rows`, fetched at Unix time `fetched_at`, settled with `deliveries`
        (same order). With a window, batches overlap: each one's own time is observed."""
        now = time.time()
        metrics.RELAY_BATCH_DURATION.observe(now - fetched_at)
        metrics.RELAY_BATCH_SIZE.observe(len(rows))
        published: Tally[str] = Tally()
        failures: Tally[str] = Tally()
        latencies: dict[str, list[float]] = {}
        epoch = _Epochs()
        for row, delivery in zip(rows, deliveries, strict=True):
            if delivery.acknowledged:
                published[row.topic] += 1
                latencies.setdefault(row.topic, []).append(now - epoch(row.time))
            elif delivery.attempted:
                failures[metrics.error_kind(delivery.error)] += 1
        for topic, values in latencies.items():
            metrics.observe_many(metrics.RELAY_COMMIT_TO_ACK.labels(topic), values)
        for topic, count in published.items():
            metrics.RELAY_PUBLISHED.labels(topic).inc(count)
        for kind, count in failures.items():
            metrics.RELAY_PUBLISH_FAILURES.labels(kind).inc(count)
        if tracing.enabled():
            tracing.send_spans([(row.topic, row.headers) for row in rows], started=fetched_at,
                               acknowledged=sum(published.values()))

    def parked(self, topic: str) -> None:
        metrics.RELAY_PARKED.labels(topic).inc()

    def lease_lost_events(self, count: int) -> None:
        metrics.RELAY_LEASE_LOST_EVENTS.inc(count)

    def failing(self, exc: BaseException | None) -> None:
        """A round or the start failed retriably; the loop backs off and retries."""
        self.beat()
        kind = "database" if isinstance(exc, psycopg.Error) else "broker"
        self._count_outage_time()
        if self._outage != kind:
            if self._outage is not None:
                metrics.RELAY_OUTAGE.labels(self._outage).set(0)
            self._outage = kind
            metrics.RELAY_OUTAGES.labels(kind).inc()
            metrics.RELAY_OUTAGE.labels(kind).set(1)
        self.health.problem("loop", f"{kind} outage: {type(exc).__name__}: {first_line(exc)}")
        self._update_ready()

    def recovered(self) -> None:
        """A round (or the start) worked."""
        if not self._started:
            self._started = True
            self.health.problem("start", None)
            self._update_ready()
        if self._outage is not None:
            self._count_outage_time()
            metrics.RELAY_OUTAGE.labels(self._outage).set(0)
            self._outage = None
            self.health.problem("loop", None)
            self._update_ready()

    # -- serving --------------------------------------------------------------------

    def start(self) -> None:
        """Serve the endpoints and run the probes, if a metrics port is set. Raises OSError
        when the port cannot be bound."""
        if not self.config.metrics_port or self._endpoints is not None:
            return
        where = f"{self.config.metrics_host}:{self.config.metrics_port}"
        try:
            self._endpoints = serve(self.health, port=self.config.metrics_port, host=self.config.metrics_host)
        except OSError as exc:
            raise ConfigError(
                "OUTBOX_RELAY_METRICS_PORT", f"cannot serve metrics on {where}: {exc.strerror or exc}"
            ) from None
        self._engine = create_engine(self.config.database_url, poolclass=NullPool)
        self._broker = BrokerProbe(
            {**self.config.kafka, "bootstrap_servers": self.config.bootstrap_servers.split(",")}
        )
        self._ticker = Ticker("relay-probes", PROBE_INTERVAL, self.probe).start()
        log.info("relay metrics and health at %s/metrics, /livez, /readyz", self._endpoints.url)

    def probe(self) -> None:
        """One probe round (the ticker's work; tests may call it)."""
        if self._engine is not None:
            self.health.problem("database", database_problem(self._backlog))
        if self._broker is not None:
            self.health.problem("broker", self._broker())
        self._note_leases()
        self._count_outage_time()
        self._update_ready()

    def close(self) -> None:
        """Stop serving; idempotent."""
        ticker, self._ticker = self._ticker, None
        if ticker is not None:
            ticker.stop()
        endpoints, self._endpoints = self._endpoints, None
        if endpoints is not None:
            endpoints.close()
        if self._broker is not None:
            self._broker.close()
        if self._engine is not None:
            self._engine.dispose()

    # -- inside -----------------------------------------------------------------------

    def _backlog(self) -> None:
        assert self._engine is not None
        with self._engine.connect() as conn:
            s = outbox_stats(conn)
        metrics.BACKLOG_COMMITTED.set(s.committed)
        metrics.BACKLOG_PUBLISHED.set(s.published)
        metrics.BACKLOG.set(s.backlog)
        metrics.BACKLOG_PARKED.set(s.parked)
        metrics.BACKLOG_UNNUMBERED.set(s.unnumbered)
        metrics.BACKLOG_OLDEST_AGE.set(s.oldest_age.total_seconds() if s.oldest_age else 0)

    def _note_leases(self) -> None:
        owned = self._leases.held()
        if owned == 0 and self._owned and not self._leases.fatal:
            # Every lease ran out unrenewed (the database was away for a TTL).
            metrics.RELAY_LEASES_LAPSED.inc(self._owned)
        self._owned = owned
        metrics.RELAY_SHARDS_OWNED.set(owned)

    def _count_outage_time(self) -> None:
        now = time.monotonic()
        if self._outage is not None and self._outage_counted_at:
            metrics.RELAY_OUTAGE_SECONDS.labels(self._outage).inc(now - self._outage_counted_at)
        self._outage_counted_at = now

    def _update_ready(self) -> None:
        metrics.RELAY_READY.set(0 if self.health.ready() else 1)


class _Epochs:
    """RFC 3339 UTC times as `relay.store.Row` has them (`2026-12-01T18:45:38.123456Z`) as Unix time.

    The events of one round mostly share their second: each distinct second
    is parsed once, the microseconds added, which halves the cost per event.
    """

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}

    def __call__(self, text: str) -> float:
        head = text[:19]
        base = self._seconds.get(head)
        if base is None:
            base = self._seconds[head] = datetime.fromisoformat(head + "+00:00").timestamp()
        return base + int(text[20:26]) * 1e-6 if len(text) == 27 else datetime.fromisoformat(text).timestamp()
