"""The relay against misuse: wrong settings, missing topics, a duplicate relay id.

Each one must cost one clear line naming the setting (never a secret) and no
event, against the real PostgreSQL and the real Kafka broker.
"""

from __future__ import annotations

import time
import uuid

import pytest
from psycopg import sql
from sqlalchemy import Engine, text

from outbox.schema import SHARDS
from relay import store

pytestmark = pytest.mark.integration


def test_prepared_statements_made_on_an_empty_outbox_delete_a_batch_of_a_large_one_by_index(
    clean_db: Engine, database_url: str
) -> None:
    """A generic plan fixed while the table was empty would scan all of it for
    every 500-id delete of a later backlog (the stall after a quiet period)."""
    me = f"plan-{uuid.uuid4().hex[:8]}"
    conn = store.connect(database_url)
    try:
        leases, _ = store.heartbeat(conn, me, ttl=120, wanted_total=SHARDS)
        assert len(leases) == SHARDS
        # Past psycopg's prepare threshold (5) and PostgreSQL's custom-plan trial (5).
        for _ in range(12):
            assert store.fetch_shards(conn, sorted(leases), 500) == []
            assert store.delete_published_fenced(conn, me, [str(uuid.uuid4())], leases) == 0
        with clean_db.begin() as db:
            db.execute(text(
                "INSERT INTO outbox_event (id, topic, key, type, payload, content_type,"
                " created_at, position)"
                " SELECT gen_random_uuid(), 'plan', 'k' || g, 't', '\\x00'::bytea,"
                " 'application/json', now(), g FROM generate_series(1, 200000) g"
            ))
            ids = [str(i) for i in db.execute(text(
                "SELECT id FROM outbox_event ORDER BY random() LIMIT 500"
            )).scalars()]

        started = time.monotonic()
        assert store.delete_published_fenced(conn, me, ids, leases) == 500
        elapsed = time.monotonic() - started
        assert len(store.fetch_shards(conn, sorted(leases), 500)) == 500

        plans = conn.execute(
            "SELECT name, statement, generic_plans, custom_plans FROM pg_prepared_statements"
        ).fetchall()
        delete = [p for p in plans if "DELETE FROM outbox_event" in p[1]]
        assert delete, plans
        assert [(p[1][:60], p[2]) for p in plans if p[2]] == []  # no statement got a generic plan
        # The plan the next execution gets, for a full batch that is still there.
        more = [str(r[0]) for r in conn.execute("SELECT id FROM outbox_event LIMIT 500").fetchall()]
        shards = sorted(leases)
        with conn.transaction(force_rollback=True):
            args = (shards, [leases[s] for s in shards], me, ",".join(more), "published")
            explained = "\n".join(row[0] for row in conn.execute(
                sql.SQL("EXPLAIN (ANALYZE) EXECUTE {}({})").format(
                    sql.Identifier(delete[0][0]), sql.SQL(", ").join(map(sql.Literal, args))
                )
            ).fetchall())
        shape = "\n".join(line[:120] for line in explained.splitlines())
        assert "Index Scan using outbox_event_pkey" in explained, shape  # plain or bitmap
        assert "Seq Scan on outbox_event " not in explained, shape
        # A sequential scan comparing 200,000 rows with 500 ids takes seconds.
        assert elapsed < 1.0, f"500-id delete took {elapsed:.2f}s"
    finally:
        store.leave(conn, me, list(range(SHARDS)))
        conn.close()
