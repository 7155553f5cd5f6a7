"""Deletes of published events on a connection and a thread of their own.

With a window (relay/window.py) the relay thread has better things to do
than wait for PostgreSQL to delete a settled batch: sending the next one.
The `Deleter` runs the fenced deletes (`store.delete_published_fenced`) one
at a time, in the order they were handed in, so deletes stay in
acknowledgement order; the relay collects each count later (`reap`) and
leaves the batch's ids out of its fetches until then, so a row being
deleted is never fetched and sent again.

A delete that finds a lease gone deletes fewer rows than it was given; the
rows it leaves were acknowledged, so they are in the log already, in order,
and their new owner only publishes them again (same ids).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from typing import Any, NamedTuple

import psycopg

from relay import store


class Pending(NamedTuple):
    future: Future[int]
    acknowledged: int
    ids: str  # comma-separated, left out of fetches until the delete is done


class Deleter:
    def __init__(self, database_url: str) -> None:
        self._database_url = database_url
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-deletes")
        self._conn: psycopg.Connection[Any] | None = None  # used by the worker thread only
        self._pending: deque[Pending] = deque()
        self._closed = False

    def submit(self, relay_id: str, ids: Sequence[str], leases: dict[int, int]) -> None:
        """Queue the fenced delete of `ids` (acknowledged events) behind the ones before it."""
        future = self._executor.submit(self._delete, relay_id, ids, leases)
        self._pending.append(Pending(future, len(ids), ",".join(ids)))

    def ids(self) -> str:
        """Ids whose delete is queued or running, comma-separated."""
        return ",".join([p.ids for p in self._pending])

    def reap(self, *, wait: bool = False, oldest: bool = False) -> list[tuple[int, int]]:
        """(deleted, acknowledged) of the deletes that are done, oldest first; all
        of them if `wait`, at least the oldest if `oldest`. Raises the database
        error of a failed one."""
        done: list[tuple[int, int]] = []
        while self._pending and (wait or (oldest and not done) or self._pending[0].future.done()):
            pending = self._pending.popleft()
            done.append((pending.future.result(), pending.acknowledged))
        return done

    def __len__(self) -> int:
        return len(self._pending)

    def forget(self) -> None:
        """After a failed delete: wait for the rest, ignore their outcome (their
        rows, if still there, go out again with the same ids)."""
        while self._pending:
            pending = self._pending.popleft()
            with suppress(Exception):  # the error that counts was raised by reap already
                pending.future.result()

    def close(self) -> None:
        """Wait for what is queued, then close the connection. Safe to call twice."""
        self.forget()
        if not self._closed:
            self._closed = True
            self._executor.submit(self._disconnect).result()
            self._executor.shutdown(wait=True)

    def _delete(self, relay_id: str, ids: Sequence[str], leases: dict[int, int]) -> int:
        try:
            if self._conn is None or self._conn.closed:
                self._conn = store.connect(self._database_url, application_name="outbox-relay-deletes")
            return store.delete_published_fenced(self._conn, relay_id, ids, leases)
        except BaseException:
            self._disconnect()
            raise

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        store.close_quietly(conn)
