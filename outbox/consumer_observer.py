"""What a `Consumer` tells the outside: metrics, health, and (on request) the HTTP endpoints.

The consumer loop calls one-line hooks (`polling`, `applied`, `dead_lettered`,
`retry`, `database_wait`, `database_back`, `batch_committed`); its handler
is timed by the wrapper `timed` returns. The metrics (outbox/metrics.py)
are always kept, in the default registry: a service that already serves
Prometheus gets them with nothing to do. To serve them from the consumer
itself, with /livez and /readyz:

    consumer = Consumer(engine, group="ledger", topics=["payments"], handler=apply_payment)
    endpoints = serve_consumer_endpoints(consumer, port=9464)   # host: 127.0.0.1 by default
    try:
        consumer.run()
    finally:
        endpoints.close()

    live    the loop polled or backed off within `liveness_timeout` (a
            database outage is waited out, so it stays live)
    ready   it polled (is in its group, with partitions or waiting for them),
            the loop is not waiting for the database or the broker, and the probes (every
            few seconds, on a thread of their own: `SELECT 1`, and the
            broker's metadata through a client of its own) answer

Never raises into the loop.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from outbox import metrics
from outbox.endpoints import DEFAULT_HOST, Endpoints, serve
from outbox.errors import first_line
from outbox.event import Event
from outbox.health import (
    DEFAULT_LIVENESS_TIMEOUT,
    PROBE_INTERVAL,
    BrokerProbe,
    Health,
    Ticker,
    database_problem,
)
from outbox.records import KafkaRecord
from outbox.tracing import traced_handler

if TYPE_CHECKING:
    from outbox.consumer import Consumer

LAG_INTERVAL = 1.0  # seconds between lag readings: the client's own numbers, no request


class ConsumerObserver:
    def __init__(self, group: str, kafka_settings: Mapping[str, Any], engine: Engine) -> None:
        self.group = group
        self.health = Health()
        self._kafka_settings = dict(kafka_settings)
        self._engine = engine
        self._lag_read_at = 0.0
        self._polled = False
        self._outage: str | None = None
        self._children: dict[tuple[Any, str], Any] = {}
        self._endpoints: Endpoints | None = None
        self._ticker: Ticker | None = None
        self._broker: BrokerProbe | None = None
        self._waits = metrics.CONSUMER_DATABASE_WAITS.labels(group)
        self._batch = metrics.CONSUMER_BATCH_DURATION.labels(group)

    # -- hooks the loop calls -----------------------------------------------------------

    def beat(self) -> None:
        self.health.beat()
        metrics.CONSUMER_HEARTBEAT.labels(self.group).set(time.time())

    def polling(self, client: Any, *, polled: bool, outage: str | None = None) -> None:
        """The loop is about to poll; `polled`: it has polled before (in the group, or
        waiting for partitions); `client`: Kafka's KafkaConsumer, for the lag, or None;
        `outage`: why its source is waiting out the broker, or None."""
        self.beat()
        if outage != self._outage:
            self._outage = outage
            self.health.problem("transport", outage)
            self._update_ready()
        if not polled:
            return
        if not self._polled:
            self._polled = True
            self.health.problem("start", None)
            self._update_ready()
        now = time.monotonic()
        if client is not None and now - self._lag_read_at >= LAG_INTERVAL:
            self._lag_read_at = now
            self._read_lag(client)

    def applied(self, event: Event, applied: bool) -> None:
        """`event`'s transaction committed: applied (its handler ran) or a duplicate (skipped)."""
        if applied:
            self._child(metrics.CONSUMER_APPLIED, event.topic).inc()
            self._child(metrics.CONSUMER_COMMIT_TO_EFFECT, event.topic).observe(
                time.time() - event.time.timestamp()
            )
        else:
            self._child(metrics.CONSUMER_DUPLICATES, event.topic).inc()

    def dead_lettered(self, record: KafkaRecord) -> None:
        self._child(metrics.CONSUMER_DEAD_LETTERED, record.topic).inc()

    def retry(self, event: Event) -> None:
        self._child(metrics.CONSUMER_RETRIES, event.topic).inc()

    def database_wait(self, reason: BaseException | None) -> None:
        self.beat()
        self._waits.inc()
        self.health.problem("loop", f"waiting for the database: {first_line(reason)}")
        self._update_ready()

    def database_back(self) -> None:
        self.health.problem("loop", None)
        self._update_ready()

    def batch_committed(self, seconds: float) -> None:
        self._batch.observe(seconds)

    def timed(self, handler: Callable[[Session, Event], object]) -> Callable[[Session, Event], object]:
        """`handler`, timing each call into outbox_consumer_handler_duration_seconds, inside a
        `process {topic}` span when OpenTelemetry is in use (outbox/tracing.py)."""
        histogram = metrics.CONSUMER_HANDLER_DURATION
        handler = traced_handler(handler, self.group)

        @functools.wraps(handler)
        def timed_handler(session: Session, event: Event) -> object:
            started = time.perf_counter()
            try:
                return handler(session, event)
            finally:
                self._child(histogram, event.topic).observe(time.perf_counter() - started)

        return timed_handler

    # -- serving --------------------------------------------------------------------------

    def serve(self, *, port: int, host: str = DEFAULT_HOST) -> Endpoints:
        if self._endpoints is not None:
            return self._endpoints
        if self._kafka_settings:  # Kafka; another transport's source waits out its own outages
            self._broker = BrokerProbe(self._kafka_settings)
        self._ticker = Ticker(f"consumer-probes-{self.group}", PROBE_INTERVAL, self.probe).start()
        self._endpoints = serve(self.health, port=port, host=host, on_close=self._stop_probes)
        return self._endpoints

    def probe(self) -> None:
        """One probe round (the ticker's work)."""
        self.health.problem("database", database_problem(self._select_one))
        if self._broker is not None:
            self.health.problem("broker", self._broker())
        self._update_ready()

    def close(self) -> None:
        """Stop serving (if it did) and the probes; idempotent."""
        endpoints, self._endpoints = self._endpoints, None
        if endpoints is not None:
            endpoints.close()  # calls _stop_probes
        self._stop_probes()

    def _stop_probes(self) -> None:
        ticker, self._ticker = self._ticker, None
        if ticker is not None:
            ticker.stop()
        if self._broker is not None:
            self._broker.close()

    # -- inside -----------------------------------------------------------------------------

    def _child(self, metric: Any, topic: str) -> Any:
        """`metric.labels(group, topic)`, looked up once: labels() takes a lock every call."""
        child = self._children.get((metric, topic))
        if child is None:
            child = self._children[(metric, topic)] = metric.labels(self.group, topic)
        return child

    def _select_one(self) -> None:
        with self._engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def _read_lag(self, client: Any) -> None:
        try:
            for tp in client.assignment():
                high = client.highwater(tp)
                position = client.position(tp, timeout_ms=0)
                if high is not None and position is not None:
                    metrics.CONSUMER_LAG.labels(self.group, tp.topic, str(tp.partition)).set(
                        max(high - position, 0)
                    )
        except Exception:  # a rebalance between assignment() and highwater(): next time
            return

    def _update_ready(self) -> None:
        metrics.CONSUMER_READY.labels(self.group).set(0 if self.health.ready() else 1)


def serve_consumer_endpoints(
    consumer: Consumer, *, port: int, host: str = DEFAULT_HOST,
    liveness_timeout: float = DEFAULT_LIVENESS_TIMEOUT,
) -> Endpoints:
    """Serve /metrics, /livez and /readyz for `consumer` on `host:port` (0: any free port).

    Returns the running `Endpoints` (`.port`, `.url`, `.close()`); close it
    when the consumer is done. Raises OSError when the port cannot be bound.
    """
    consumer.observer.health.liveness_timeout = liveness_timeout
    return consumer.observer.serve(port=port, host=host)
