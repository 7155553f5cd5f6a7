"""The relay loop: fetch committed events in commit order, publish, then forget.

One round (`run_once`):

1. fetch the oldest committed events (by `position`, which is commit order
   per key) that are not already in flight, in one short statement;
2. hand them to the `Publisher`, which sends them and returns at once; the
   batch joins the window of up to `max_in_flight` batches whose
   acknowledgements (acks=all) are on their way. No database transaction
   is open meanwhile;
3. settle the batches at the head of the window whose outcomes are in,
   oldest first (waiting for the oldest when the window is full or there
   was nothing more to send): delete the acknowledged events and count
   them, in one transaction per batch;
4. for refused events: count the attempt; park the event once it has failed
   `max_attempts` times for reasons of its own (see `_settle_failures`).

A failure in the window stops the sending until every batch in flight is
settled, holds back the later events of the failed events' keys, and
replaces the producer: relay/window.py has the rule and why it keeps every
key in commit order. `max_in_flight=1` is one batch at a time.

Before the first round (`run`), the relay checks what waiting cannot fix,
and raises `ConfigError` / `SchemaError` for it: the database refuses the
URL (password, database name, TLS), the kit's tables are missing, another
live relay uses the same relay id, the Kafka client or broker refuses the
settings (a bad value, SASL credentials, TLS). The same refusals after a
good start (a password rotated under a running relay) are waited out with
backoff and logged once per cause. An unreachable database or broker is an
outage, at start too: waited out.

A crash anywhere in 1-3 leaves the unacknowledged-or-undeleted events in the
table, and the next round publishes them again with the same event ids: at
least once, never lost, and at most the window republished. Consumers
deduplicate by id.

Any number of relays can run at once. Each publishes only the key shards it
holds a lease on (relay/leases.py), so one key is published by one relay at
a time, and the delete in step 3 is fenced by the lease's epoch.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from tenacity import RetryCallState, Retrying, retry_if_exception_type

from outbox.backoff import backoff, next_retry
from outbox.envelope import HeaderEncoder
from outbox.errors import ConfigError, OutboxError, describe_error, first_line
from outbox.failpoints import failpoint
from relay import store
from relay.config import RelayConfig
from relay.deleter import Deleter
from relay.leases import ShardLeases
from relay.observer import RelayObserver
from relay.publisher import Checked, Delivery, Message, Pipelined, Publisher, Sending, Settled
from relay.publishers import make_publisher
from relay.window import InFlight, Window

log = logging.getLogger(__name__)

# How often an idle relay waiting for a NOTIFY looks whether it was asked to stop.
_STOP_CHECK_SECONDS = 0.25


class BrokerUnavailable(Exception):
    """No event of a round was acknowledged and the errors were retriable: an outage."""


RETRIABLE = (psycopg.OperationalError, psycopg.InterfaceError, BrokerUnavailable)


class Relay:
    def __init__(
        self,
        config: RelayConfig,
        *,
        publisher: Publisher | None = None,
        sleep: Callable[[float], object] | None = None,
    ) -> None:
        self.config = config
        self._publisher = publisher or make_publisher(config)
        self._headers = HeaderEncoder(config.source)
        self.leases = ShardLeases(config.database_url, config.relay_id, ttl=config.lease_ttl)
        self._conn: psycopg.Connection[Any] | None = None
        self._stopping = threading.Event()
        self._sleep: Callable[[float], object] = sleep or self._stopping.wait
        self.published = 0
        self.parked = 0
        self._failing: str | None = None  # the cause last logged, while rounds fail
        self._window = Window(config.max_in_flight)
        # With a window, deletes run beside the sending (relay/deleter.py).
        self._deleter = Deleter(config.database_url) if config.max_in_flight > 1 else None
        self._fetched = 0  # rows the last round fetched
        self.observer = RelayObserver(config, self.leases)  # metrics, health (relay/observer.py)

    # -- the loop -----------------------------------------------------------

    def run(self) -> None:
        """Publish until `stop()`. Outages are waited out with bounded backoff.

        Raises `ConfigError` or `SchemaError` for what waiting cannot fix (see
        the module docstring), at start, or later for a duplicate relay id or
        a database that lost the kit's tables.
        """
        log.info("relay starting: %s", self.config.describe())
        retrying = Retrying(
            retry=retry_if_exception_type(RETRIABLE),
            wait=backoff(self.config.backoff_initial, self.config.backoff_max),
            stop=lambda _state: self._stopping.is_set(),
            sleep=self._backoff_sleep,
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            self.observer.start()
            retrying(self._start)
            self._recovered()
            retrying = retrying.copy()
            self.leases.start()
            while not self._stopping.is_set():
                published = retrying(self._round_or_wait)
                self._recovered()
                if published:
                    retrying = retrying.copy()  # a good round resets the backoff
            self.drain()  # stopping: the window acknowledged and deleted first
        except RETRIABLE as exc:
            # Stopped during an outage: nothing acknowledged is left unforgotten.
            log.info("relay stopping during an outage (%s)", type(exc).__name__)
        finally:
            self.close()
        log.info("relay stopped: %d events published, %d parked", self.published, self.parked)

    def run_once(self) -> int:
        """One round: send one more batch if the window has room, then settle the
        batches whose outcomes are in. Returns how many events were acknowledged."""
        window = self._window
        self.observer.round_started()
        self._reap()
        deleting = self._deleting()
        if deleting and window.full(deleting):
            self._reap(oldest=True)  # deletes count in the window: a crash would send them again
            deleting = self._deleting()
        leases = self.leases.current()
        self._fetched = 0
        if leases and window.open(deleting):
            conn = self._connect()
            fetched_at = time.time()
            excluding = window.ids()
            if deleting and self._deleter is not None:
                excluding = f"{excluding},{self._deleter.ids()}" if excluding else self._deleter.ids()
            rows = store.fetch_shards(conn, sorted(leases), self.config.batch_size, excluding=excluding)
            if rows:
                self._fetched = len(rows)
                try:
                    sending = self._send(rows)
                except BrokerUnavailable:
                    self.drain()  # what is in flight is settled before the outage is waited out
                    raise
                window.push(InFlight(rows, sending, leases, fetched_at))
        if not window:
            return 0
        # Wait for the oldest batch only when there is nothing better to do.
        return self._settle(block=window.full(self._deleting()) or self._fetched < self.config.batch_size)

    def drain(self) -> int:
        """Settle every batch in flight (waiting for each, and for their deletes);
        returns how many were acknowledged."""
        settled = 0
        while self._window:
            settled += self._settle(block=True)
        self._reap(wait=True)
        return settled

    def _send(self, rows: Sequence[store.Row]) -> Sending:
        try:
            messages = self._messages(rows)
            if isinstance(self._publisher, Pipelined):
                return self._publisher.send(messages)
            return Settled(self._publisher.publish(messages))
        except ConfigError as exc:
            # Checked at start, so the broker now refuses what it took then (a
            # rotated SASL password, a replaced certificate): wait for the fix.
            raise BrokerUnavailable(str(exc)) from exc
        except Exception as exc:
            # The publisher could not even try (no broker reachable, client
            # failure): nothing was acknowledged, so nothing is forgotten.
            raise BrokerUnavailable(f"{type(exc).__name__}: {first_line(exc)}") from exc

    def _settle(self, *, block: bool) -> int:
        """Settle batches from the head of the window, oldest first: the head
        (waiting for it if `block`), then each one after it that is done; all
        of them, waited for, once a failure has broken the window."""
        window = self._window
        conn = self._connect()
        acknowledged = 0
        failed: list[tuple[store.Row, Delivery]] = []
        while window and (block or window.broken or window.head().sending.done()):
            block = False
            batch = window.pop()
            deliveries = window.outcomes(batch, batch.sending.wait())
            self.observer.batch(batch.rows, deliveries, fetched_at=batch.fetched_at)
            acked = [row.id for row, d in zip(batch.rows, deliveries, strict=True) if d.acknowledged]
            if acked:
                failpoint("relay-after-ack")
                if self._deleter is not None:
                    self._deleter.submit(self.config.relay_id, acked, batch.leases)
                else:
                    self._count_deleted(
                        store.delete_published_fenced(conn, self.config.relay_id, acked, batch.leases),
                        len(acked),
                    )
            acknowledged += len(acked)
            failed.extend((row, d) for row, d in zip(batch.rows, deliveries, strict=True)
                          if not d.acknowledged)
        if window.broken and not window:
            log.warning(
                "window settled after a failure: %d event(s) failed, %d later event(s) of their "
                "keys held back (sent again after them); replacing the producer",
                window.failed, window.held_back,
            )
            window.clear()
            self._publisher.close()  # rule 3: the next batch goes out from a new producer
        if failed:
            self._settle_failures(conn, failed, broker_healthy=bool(acknowledged))
        return acknowledged

    def _count_deleted(self, deleted: int, acknowledged: int) -> None:
        if deleted < acknowledged:
            # Leases lapsed while the batch was in flight: the new owners
            # publish these again (same ids) and delete them.
            log.warning(
                "lost shard leases during a round: %d acknowledged events left to their new owner",
                acknowledged - deleted,
            )
            self.observer.lease_lost_events(acknowledged - deleted)
            self._window.fence()
        self.published += deleted

    def _deleting(self) -> int:
        return len(self._deleter) if self._deleter is not None else 0

    def _reap(self, *, wait: bool = False, oldest: bool = False) -> None:
        if self._deleter is not None:
            for deleted, acknowledged in self._deleter.reap(wait=wait, oldest=oldest):
                self._count_deleted(deleted, acknowledged)

    def _abandon_window(self) -> None:
        """After an error in the middle of a round (the database gone): wait out
        what is in flight without deleting it (its rows go out again, same ids,
        from a new producer), so that the old producer has settled, or been
        dropped at its deadline, before the new one sends anything."""
        if self._deleter is not None:
            try:
                self._reap(wait=True)  # what was deleted is counted (and a lost lease logged)
            except Exception:  # the database is gone: the error that counts is being raised
                self._deleter.forget()
        if self._window:
            for batch in self._window.clear():
                batch.sending.wait()
            self._publisher.close()

    def stop(self) -> None:
        """Ask `run` to return after the round in flight. Safe to call at any time, twice."""
        self._stopping.set()

    def close(self) -> None:
        self.observer.close()
        self._abandon_window()
        if self._deleter is not None:
            self._deleter.close()
        self.leases.stop()
        self._publisher.close()
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            conn.close()

    # -- steps --------------------------------------------------------------

    def _start(self) -> None:
        """The checks before the first round; outages are retried around it."""
        try:
            self._connect()
        except (psycopg.OperationalError, psycopg.ProgrammingError) as exc:
            self._drop_connection()
            problem = store.misconfiguration(exc, self.config.database_url)
            if problem is not None:
                raise ConfigError("OUTBOX_DATABASE_URL", problem) from None
            raise
        if isinstance(self._publisher, Checked):
            try:
                self._publisher.check()
            except OutboxError:
                raise
            except Exception as exc:
                raise BrokerUnavailable(describe_error(exc)) from exc
        # Last, so that a relay still waiting for its broker holds no leases.
        self.leases.beat()  # takes the relay id's lock, or finds another process has it
        if self.leases.fatal is not None:
            raise self.leases.fatal

    def _recovered(self) -> None:
        self.observer.recovered()
        if self._failing is not None:
            log.info("relay works again after: %s", self._failing)
            self._failing = None

    def _round_or_wait(self) -> int:
        if self.leases.fatal is not None:
            raise self.leases.fatal
        try:
            published = self.run_once()
        except BaseException as exc:
            self._abandon_window()
            if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
                self._drop_connection()
            raise
        if not self._window and self._fetched < self.config.batch_size and not self._stopping.is_set():
            self._wait_for_events()
        return published

    def _connect(self) -> psycopg.Connection[Any]:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        conn = store.connect(self.config.database_url)
        try:
            store.require_schema(conn, self.config.database_url)
            if self.config.listen:
                store.listen(conn)
        except BaseException:
            store.close_quietly(conn)
            raise
        self._conn = conn
        return conn

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        store.close_quietly(conn)

    def _wait_for_events(self) -> None:
        """Sleep until NOTIFY or the poll interval; a missed NOTIFY costs at most one interval."""
        conn = self._connect()
        if not self.config.listen:
            self._sleep(self.config.poll_interval)
            return
        # Notifications that arrived while we were publishing are delivered at once.
        # The wait is cut into slices: stop() cannot interrupt psycopg's wait, and
        # SIGTERM must not wait out a poll interval of up to a minute.
        woken = False
        deadline = time.monotonic() + self.config.poll_interval
        while not woken and not self._stopping.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for _ in conn.notifies(timeout=min(left, _STOP_CHECK_SECONDS), stop_after=1):
                woken = True
                break
        if woken and self.config.linger_ms:
            # Every committing transaction notifies; without a pause each commit
            # would cost a whole round (fetch, send, flush, delete) of its own.
            self._sleep(self.config.linger_ms / 1000)
            for _ in conn.notifies(timeout=0):
                pass  # all answered by the next round

    def _messages(self, rows: Sequence[store.Row]) -> list[Message]:
        encode = self._headers.encode
        loads = json.loads
        return [
            Message(
                event_id, topic, key.encode(), payload,
                encode(event_id, event_type, time, content_type, loads(headers) if headers != "{}" else {}),
            )
            for event_id, topic, key, event_type, payload, content_type, headers, time in rows
        ]

    def _settle_failures(
        self,
        conn: psycopg.Connection[Any],
        failed: Sequence[tuple[store.Row, Delivery]],
        *,
        broker_healthy: bool,
    ) -> None:
        """Count attempts that were the event's own fault; park at `max_attempts`.

        A retriable error while nothing in the round was acknowledged is an
        outage: nobody's fault, nothing counted, the round is retried with
        backoff for as long as it takes. Parking never happens because the
        broker is down.
        """
        attempted = [(row, d) for row, d in failed if d.attempted]
        own_fault = [(row, d) for row, d in attempted if broker_healthy or not d.retriable]
        for row, delivery in own_fault:
            attempts = store.record_failure(conn, row.id, delivery.error or "unknown")
            log.warning(
                "publish failed: event_id=%s topic=%s attempt=%d/%d error=%s",
                row.id, row.topic, attempts, self.config.max_attempts, delivery.error,
            )
            if attempts >= self.config.max_attempts:
                store.park(conn, row.id)
                self.parked += 1
                self.observer.parked(row.topic)
                log.error(
                    "event parked: event_id=%s topic=%s key=%s after %d attempts: %s",
                    row.id, row.topic, row.key, attempts, delivery.error,
                )
        if len(own_fault) < len(attempted) or not own_fault:
            first = next((d.error for _, d in failed if d.error), "unknown")
            raise BrokerUnavailable(f"{len(failed)} event(s) not acknowledged: {first}")
        if own_fault:
            # Give a struggling topic or partition a moment before the next round.
            self._sleep(self.config.backoff_initial)

    def _backoff_sleep(self, seconds: float) -> None:
        self.observer.beat()  # an outage is waited out, not a dead loop: /livez stays 200
        self._sleep(seconds)

    def _log_retry(self, state: RetryCallState) -> None:
        exc, wait = next_retry(state)
        self.observer.failing(exc)
        cause = f"{type(exc).__name__}: {first_line(exc)}"
        # Once per cause: an outage or a rotated password is one line, and one
        # more when it is over, not a line per retry.
        level = logging.DEBUG if cause == self._failing else logging.WARNING
        log.log(level, "relay round failed (%s); retrying with backoff (next in %.1fs)", cause, wait)
        self._failing = cause
