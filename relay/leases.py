"""Key-shard leases: how several relays share the outbox without reordering a key.

Every event belongs to one of `SHARDS` shards by a hash of its key (a stored
column of outbox_event). A relay publishes only events of shards it holds a
lease on, and a shard is leased to one relay at a time, so one key is only
ever published by one relay at a time. Row claiming (SKIP LOCKED across
relays) would let two relays publish one key's events concurrently and
reorder them; key ownership cannot.

A background thread renews the leases every `ttl / 3` on a connection of its
own (so a slow broker never delays a renewal), gives back shards above this
relay's fair share (`ceil(SHARDS / live relays)`) and claims free or expired
ones up to it. Each claim bumps the shard's `epoch`.

The lease connection also holds an advisory lock on the relay id for the
relay's life: a second process started with the same `OUTBOX_RELAY_ID` is
refused at start (and one that finds the lock taken on a reconnect stops),
instead of sharing the leases and publishing every event twice.

Fencing, twice:
- locally, `current()` returns a lease only while it is surely still valid:
  until the moment the renewal was *sent* plus the TTL, minus a margin. A
  relay that was paused (SIGSTOP, GC, VM freeze) or cut off finds its leases
  gone when it resumes and publishes nothing more of those shards;
- in the database, the delete of published rows checks owner, epoch and
  expiry under FOR SHARE (relay/store.py), so a relay that lost a shard
  cannot mark its events, and a new owner's claim waits for a delete in flight.

A batch that was already being sent when its lease ran out can still reach
Kafka (only Kafka transactions could fence that, see the README); its events
were committed and are published again by the new owner with the same ids,
so consumers see duplicates, which the inbox skips, and never an event before
an earlier one of its key (each relay publishes a key's events in position
order, and rows are deleted only after acknowledgement).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg

from outbox.errors import ConfigError, describe_error
from outbox.schema import SHARDS
from relay import store

log = logging.getLogger(__name__)

# Fraction of the TTL a lease is considered lost before the database would
# expire it: covers the time between the renewal's commit and our clock read.
SAFETY_MARGIN = 0.2


class ShardLeases:
    def __init__(
        self,
        database_url: str,
        relay_id: str,
        *,
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.relay_id = relay_id
        self.ttl = ttl
        self.interval = ttl / 3
        self._database_url = database_url
        self._clock = clock
        self._lock = threading.Lock()
        self._owned: dict[int, int] = {}
        self._valid_until = 0.0
        self._last_beat = float("-inf")
        self._conn: psycopg.Connection[Any] | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._failing: str | None = None
        self._never_joined = True
        self.live_relays = 0
        # Set when another live process uses our relay id; the relay stops on it.
        self.fatal: ConfigError | None = None

    def start(self) -> None:
        """Renew in the background until `stop()`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="relay-leases", daemon=True)
            self._thread.start()

    def current(self) -> dict[int, int]:
        """{shard: epoch} of the leases that are surely still ours right now."""
        if self._thread is None and self._clock() - self._last_beat >= self.interval:
            self.beat()  # no background thread (tests, benchmarks): renew inline
        with self._lock:
            if self._clock() >= self._valid_until:
                return {}
            return dict(self._owned)

    def held(self) -> int:
        """How many leases are surely ours now. Never renews, so any thread may ask (metrics)."""
        with self._lock:
            return len(self._owned) if self._clock() < self._valid_until else 0

    def beat(self) -> None:
        """One renewal round; on a database error the old leases simply run out."""
        sent_at = self._clock()
        try:
            conn = self._connect()
            owned, live = store.heartbeat(conn, self.relay_id, ttl=self.ttl, wanted_total=SHARDS)
        except psycopg.Error as exc:
            self._drop_connection()
            self._last_beat = sent_at
            failure = describe_error(exc)
            # Once per cause, not once per renewal (every ttl/3 seconds).
            if failure != self._failing:
                log.warning("lease renewal failed (%s); leases lapse unless renewed", failure)
            self._failing = failure
            return
        except ConfigError as exc:
            self._drop_connection()
            with self._lock:
                self._owned, self._valid_until = {}, 0.0
            self.fatal = exc
            self._stopping.set()
            return
        self._never_joined = False
        if self._failing is not None:
            log.info("lease renewal works again")
            self._failing = None
        with self._lock:
            gained = sorted(set(owned) - set(self._owned))
            lost = sorted(set(self._owned) - set(owned))
            self._owned = owned
            self._valid_until = sent_at + self.ttl * (1 - SAFETY_MARGIN)
        self._last_beat = sent_at
        self.live_relays = live
        if gained or lost:
            log.info(
                "shard leases: relay=%s owns %d/%d (gained %s, lost %s, %d relays alive)",
                self.relay_id, len(owned), SHARDS, gained or "-", lost or "-", live,
            )

    def stop(self) -> None:
        """Give every lease back so the other relays take over at once. Safe twice."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=self.ttl + 5)
            self._thread = None
        with self._lock:
            shards = list(self._owned)
            self._owned = {}
            self._valid_until = 0.0
        if self.fatal is not None or self._never_joined:
            # Nothing to give back: never joined, or the leases under our id
            # are the other process's now.
            self._drop_connection()
            return
        try:
            store.leave(self._connect(), self.relay_id, shards)
        except (psycopg.Error, ConfigError):
            log.info("could not give leases back; they expire in %.1fs", self.ttl)
        self._drop_connection()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self.beat()
            self._stopping.wait(self.interval)

    def _connect(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            conn = store.connect(self._database_url, application_name="outbox-relay-leases")
            if not store.lock_relay_id(conn, self.relay_id):
                conn.close()
                raise ConfigError(
                    "OUTBOX_RELAY_ID",
                    f"{self.relay_id!r} is in use by another live relay process; two relays with "
                    "one id would share its leases and publish the same events twice: give each "
                    "process its own OUTBOX_RELAY_ID, or leave it unset for a unique one",
                )
            self._conn = conn
        return self._conn

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        store.close_quietly(conn)
