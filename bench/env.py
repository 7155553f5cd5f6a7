"""What every measurement shares: the services, fresh topics, clean kit tables, a backlog fill.

The benchmark owns its database: `reset` truncates the kit's tables, so
`check_database_is_ours` refuses a database other clients are using (the
devstack's `outbox` database is shared with the test suite).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
from kafka.admin import KafkaAdminClient, NewTopic
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url

from outbox.config import safe_url
from relay import store

log = logging.getLogger(__name__)

APPLICATION_NAME = "outbox-bench"
PARTITIONS = 4  # the devstack broker's num.partitions

# One payment-like event. The same template fills the backlog in SQL
# (format()) and builds the raw producer's messages in Python (%), so both
# sides send messages of the same size with the same headers.
PAYLOAD_TEMPLATE = (
    '{"payment_id":"%s","merchant":"m-%s","amount_minor":%s,"currency":"EUR",'
    '"status":"captured","version":3}'
)
EVENT_TYPE = "payment.captured"

_FILL = """
INSERT INTO outbox_event (id, position, topic, key, type, payload, content_type, headers, created_at)
SELECT gen_random_uuid(), nextval('outbox_event_position_seq'), %(topic)s, k, %(type)s,
       convert_to(format(%(template)s, k, lpad((g %% 10000)::text, 4, '0'), 1000 + g %% 9000),
                  'UTF8'),
       'application/json',
       jsonb_build_object('traceparent', '00-' || md5(k) || '-' || left(md5(g::text), 16) || '-01'),
       clock_timestamp()
FROM (SELECT g, gen_random_uuid()::text AS k FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS g) AS s
"""

TRIGGER = "outbox_event_assign_position"


def payment_payload(key: str, n: int) -> bytes:
    """The bytes `_FILL` stores for row `n` with key `key`."""
    return (PAYLOAD_TEMPLATE % (key, f"{n % 10000:04d}", 1000 + n % 9000)).encode()


def traceparent(key: str, n: int) -> str:
    """The `traceparent` header `_FILL` stores for row `n` with key `key`."""
    return (
        f"00-{hashlib.md5(key.encode()).hexdigest()}-"
        f"{hashlib.md5(str(n).encode()).hexdigest()[:16]}-01"
    )


@dataclass
class FillReport:
    rows: int
    seconds: float
    trigger_disabled: bool

    def describe(self) -> str:
        how = (
            "trigger disabled during the fill, positions from nextval(), re-enabled after"
            if self.trigger_disabled
            else "positions from nextval() in the INSERT (the commit trigger finds nothing to do)"
        )
        return f"{self.rows:,} rows in {self.seconds:.1f}s ({how})"


@dataclass
class BenchEnv:
    database_url: str
    bootstrap_servers: str
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    topics: list[str] = field(default_factory=list)

    # -- database -------------------------------------------------------------

    @property
    def database_name(self) -> str:
        return str(make_url(self.database_url).database)

    def connect(self, *, autocommit: bool = True, name: str = APPLICATION_NAME) -> psycopg.Connection[Any]:
        conn = store.connect(self.database_url, application_name=name)
        conn.autocommit = autocommit
        return conn

    def engine(self, *, pool_size: int = 5, options: str | None = None) -> Engine:
        connect_args: dict[str, Any] = {"application_name": APPLICATION_NAME}
        if options:
            connect_args["options"] = options
        return create_engine(
            self.database_url, pool_size=pool_size, max_overflow=0, connect_args=connect_args
        )

    def check_database_is_ours(self) -> None:
        """Refuse a database that other clients (a test run?) are connected to."""
        with self.connect() as conn:
            row = conn.execute(
                "SELECT count(*), string_agg(DISTINCT coalesce(nullif(application_name, ''), '?'), ', ')"
                " FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
                " AND backend_type = 'client backend'"
            ).fetchone()
        others, names = (int(row[0]), row[1]) if row else (0, None)
        if others:
            own = make_url(self.database_url).set(database="outbox_bench")
            raise SystemExit(
                f"bench: database {self.database_name!r} has {others} other client connection(s) "
                f"({names}); the benchmark truncates the kit's tables, so give it a database of "
                f"its own, e.g. `make bench-quick` or --database-url "
                f"{safe_url(own.render_as_string(hide_password=False))} with the password filled in "
                "(see bench/README.md), or stop the other clients"
            )

    def reset(self) -> None:
        """Empty the kit's tables and forget every relay; only ever on the bench database."""
        with self.connect() as conn:
            conn.execute(f"ALTER TABLE outbox_event ENABLE TRIGGER {TRIGGER}")
            conn.execute(
                "TRUNCATE outbox_event, outbox_parked, outbox_inbox, outbox_dead_letter,"
                " outbox_relay_member"
            )
            conn.execute("UPDATE outbox_relay_lease SET owner = NULL, expires_at = NULL")

    def backlog(self, conn: psycopg.Connection[Any]) -> int:
        row = conn.execute("SELECT count(*) FROM outbox_event").fetchone()
        return int(row[0]) if row else 0

    def published(self, conn: psycopg.Connection[Any]) -> int:
        row = conn.execute("SELECT value FROM outbox_counter WHERE name = 'published'").fetchone()
        return int(row[0]) if row else 0

    def fill(
        self,
        topic: str,
        rows: int,
        *,
        chunk: int = 100_000,
        disable_trigger: bool | None = None,
        first: int = 1,
        on_progress: Callable[[int], None] | None = None,
        notify: bool = False,
    ) -> FillReport:
        """Add `rows` committed events to the backlog, fast.

        Positions come from the sequence in the INSERT itself; with no row
        left NULL, the commit trigger has nothing to number (each firing is
        one probe of an empty partial index). For millions of rows even those
        firings add up, so large fills disable the trigger and re-enable it
        after. `notify` sends the relay's wake-up in the last chunk's
        transaction, as the trigger would.
        """
        if disable_trigger is None:
            disable_trigger = rows >= 1_000_000
        started = time.perf_counter()
        done = 0
        with self.connect() as conn:
            if disable_trigger:
                conn.execute(f"ALTER TABLE outbox_event DISABLE TRIGGER {TRIGGER}")
            try:
                while done < rows:
                    n = min(chunk, rows - done)
                    with conn.transaction():
                        conn.execute(_FILL, {
                            "topic": topic, "type": EVENT_TYPE, "template": PAYLOAD_TEMPLATE,
                            "first": first + done, "last": first + done + n - 1,
                        })
                        if notify and done + n >= rows:
                            conn.execute("SELECT pg_notify('outbox_event', '')")
                    done += n
                    if on_progress:
                        on_progress(done)
            finally:
                if disable_trigger:
                    conn.execute(f"ALTER TABLE outbox_event ENABLE TRIGGER {TRIGGER}")
        return FillReport(rows, time.perf_counter() - started, disable_trigger)

    # -- kafka ----------------------------------------------------------------

    def topic(self, name: str, partitions: int = PARTITIONS) -> str:
        """A fresh topic for one measurement; deleted by `close`."""
        topic = f"bench-{self.run_id}-{name}"
        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap_servers, client_id=APPLICATION_NAME)
        try:
            admin.create_topics([NewTopic(topic, partitions, 1)])
        finally:
            admin.close()
        self.topics.append(topic)
        _wait_for_topic(self.bootstrap_servers, topic, partitions)
        return topic

    def delete_topics(self) -> None:
        if not self.topics:
            return
        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap_servers, client_id=APPLICATION_NAME)
        try:
            admin.delete_topics(self.topics)
        except Exception as exc:  # leftovers expire with log.retention.hours
            log.warning("could not delete bench topics: %s", exc)
        finally:
            admin.close()
        self.topics.clear()

    def end_offsets(self, topic: str) -> int:
        """How many messages the broker holds on `topic` (sum of end offsets)."""
        from kafka import KafkaConsumer, TopicPartition

        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap_servers)
        try:
            parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
            return int(sum(consumer.end_offsets(parts).values()))
        finally:
            consumer.close()

    # -- processes ------------------------------------------------------------

    def child_env(self, **extra: str) -> dict[str, str]:
        env = {
            k: v for k, v in os.environ.items()
            if not k.startswith(("OUTBOX_RELAY_", "OUTBOX_KAFKA_", "OUTBOX_CONSUMER_"))
        }
        env.update({
            "OUTBOX_DATABASE_URL": self.database_url,
            "OUTBOX_KAFKA_BOOTSTRAP_SERVERS": self.bootstrap_servers,
            "PYTHONUNBUFFERED": "1",
        })
        env.update(extra)
        return env


def _wait_for_topic(servers: str, topic: str, partitions: int, timeout: float = 30.0) -> None:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(bootstrap_servers=servers)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = consumer.partitions_for_topic(topic)
            if found and len(found) == partitions:
                return
            time.sleep(0.2)
            consumer.topics()  # refresh metadata
        raise RuntimeError(f"topic {topic} did not appear within {timeout}s")
    finally:
        consumer.close()


@contextmanager
def timed() -> Iterator[list[float]]:
    """`with timed() as t: ...` then t[0] is the elapsed seconds."""
    box: list[float] = []
    started = time.perf_counter()
    try:
        yield box
    finally:
        box.append(time.perf_counter() - started)
