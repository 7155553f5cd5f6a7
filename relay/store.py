"""Every SQL statement the relay runs, for PostgreSQL. The loop reads as Python.

The relay talks to PostgreSQL over one psycopg connection in autocommit mode;
each function here is one short statement or one short transaction, and no
transaction is ever held open while the broker is being waited for.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

import psycopg
from psycopg.rows import args_row
from sqlalchemy.engine import make_url

from outbox.config import safe_url
from outbox.errors import SchemaError, login_refused
from outbox.schema import (
    NOTIFY_CHANNEL,
    PUBLISHED_BUCKET_PREFIX,
    PUBLISHED_COUNTER,
    RATE_BUCKET_SECONDS,
    outbox_counter,
    outbox_event,
    outbox_parked,
    outbox_relay_lease,
    outbox_relay_member,
)

log = logging.getLogger(__name__)

# The tables' names come from outbox/schema.py and are spelled into each
# statement once, here at import: the statements stay plain strings, so a
# round costs the same as with the names written out.
EVENT, PARKED, COUNTER = outbox_event.name, outbox_parked.name, outbox_counter.name
LEASE, MEMBER = outbox_relay_lease.name, outbox_relay_member.name

_RECORD_FAILURE = f"""
UPDATE {EVENT} SET attempts = attempts + 1, last_error = %s
WHERE id = %s::uuid
RETURNING attempts
"""

_PARK = f"""
WITH parked AS (
    DELETE FROM {EVENT} WHERE id = %s::uuid
    RETURNING id, topic, key, type, payload, content_type, headers, created_at, position,
              attempts, last_error
)
INSERT INTO {PARKED} (id, topic, key, type, payload, content_type, headers, created_at,
                      position, attempts, error)
SELECT id, topic, key, type, payload, content_type, headers, created_at, position,
       attempts, coalesce(last_error, 'unknown')
FROM parked
"""


class Row(NamedTuple):
    """One committed event as `fetch_shards` reads it: what goes on the wire, as text.

    The id and the time come as the text of their CloudEvents headers, the
    user headers as JSON text; no UUID, datetime or dict is made for an event
    that has none of them to convert (see outbox.envelope.HeaderEncoder).
    """

    id: str  # canonical UUID text
    topic: str
    key: str
    type: str
    payload: bytes
    content_type: str
    headers: str  # a JSON object of strings, '{}' when there are none
    time: str  # RFC 3339 UTC with microseconds, as outbox.envelope.format_time writes it


def connect(
    database_url: str, *, application_name: str = "outbox-relay"
) -> psycopg.Connection[Any]:
    """An autocommit psycopg connection from a SQLAlchemy-style URL, whose
    prepared statements are planned for each execution's own parameters."""
    url = make_url(database_url)
    params: dict[str, Any] = {
        "host": url.host,
        "port": url.port,
        "user": url.username,
        "password": url.password,
        "dbname": url.database,
        "application_name": application_name,
        "connect_timeout": 10,
        # Notice a dead server within seconds rather than at the next TCP timeout.
        "keepalives": 1,
        "keepalives_idle": 5,
        "keepalives_interval": 2,
        "keepalives_count": 3,
    }
    params.update({k: v for k, v in url.query.items() if isinstance(v, str)})
    conn = psycopg.connect(autocommit=True, **{k: v for k, v in params.items() if v is not None})
    # psycopg prepares a statement on its 5th run, and after five more PostgreSQL
    # may keep one generic plan for good: made while the outbox was empty, it is a
    # sequential scan, and every 500-id delete of a later backlog then reads the
    # whole table. A plan made for each run's own values costs a fraction of a
    # millisecond and follows the table's size; the parse is still saved. Set
    # after the URL's own `options`, so they cannot turn it back.
    conn.execute("SET plan_cache_mode = force_custom_plan")
    return conn


def misconfiguration(exc: psycopg.Error, database_url: str) -> str | None:
    """What a failed connection says is wrong with the URL (password, database
    name, TLS mode), or None when the server is merely unreachable."""
    reason = login_refused(exc)
    if reason is None:
        return None
    if "password authentication failed" in reason:
        reason = f"the server refused the password for user {make_url(database_url).username!r}"
    elif "SSL" in reason or "certificate" in reason or "sslmode" in reason:
        reason = f"TLS: {reason}; check sslmode (and sslrootcert) in the URL's query"
    return f"{reason} (database {safe_url(database_url)})"


_TABLES = (EVENT, PARKED, COUNTER, LEASE, MEMBER)
_MISSING_TABLES = "SELECT t FROM unnest(%s::text[]) AS t WHERE to_regclass(t) IS NULL"


def require_schema(conn: psycopg.Connection[Any], database_url: str) -> None:
    """Refuse a database without the kit's tables: the relay would find no
    leases and no events there, and say nothing, forever."""
    missing = [row[0] for row in conn.execute(_MISSING_TABLES, (list(_TABLES),)).fetchall()]
    if missing:
        raise SchemaError(
            f"database {safe_url(database_url)} lacks the kit's tables ({', '.join(missing)}): "
            "run `outbox db upgrade` against it (or point OUTBOX_DATABASE_URL at the right database)"
        )


def close_quietly(conn: psycopg.Connection[Any] | None) -> None:
    """Close a connection that may already be broken; closing must not hide the real error."""
    if conn is None:
        return
    try:
        conn.close()
    except Exception:
        log.debug("error while closing a broken connection", exc_info=True)


def listen(conn: psycopg.Connection[Any]) -> None:
    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")


def record_failure(conn: psycopg.Connection[Any], event_id: str, error: str) -> int:
    """Count one failed attempt; returns the event's attempts so far (0 if it is gone)."""
    row = conn.execute(_RECORD_FAILURE, (error[:2000], event_id)).fetchone()
    return int(row[0]) if row else 0


def park(conn: psycopg.Connection[Any], event_id: str) -> None:
    """Move an event that cannot be published into outbox_parked, in one statement."""
    conn.execute(_PARK, (event_id,))


# -- shard leases (relay/leases.py) ------------------------------------------

_HEARTBEAT = f"""
INSERT INTO {MEMBER} (relay_id, heartbeat_at, started_at)
VALUES (%(me)s, now(), now())
ON CONFLICT (relay_id) DO UPDATE SET heartbeat_at = now()
"""

_FORGET_DEAD_MEMBERS = f"""
DELETE FROM {MEMBER} WHERE heartbeat_at < now() - make_interval(secs => %(ttl)s)
"""

_LIVE_MEMBERS = f"SELECT count(*) FROM {MEMBER}"

# Every statement that locks several lease rows locks them in shard order
# (a locking subquery, sorted: ORDER BY is applied before the rows are
# locked), the fenced delete below included. An UPDATE alone locks in the
# order its scan meets the rows, which is physical order and changes as the
# rows are rewritten; against the delete's shard order, a renewal and a
# delete of the same relay deadlocked now and then (issue 11's 1M run).
_RENEW = f"""
UPDATE {LEASE} SET expires_at = now() + make_interval(secs => %(ttl)s)
WHERE shard IN (
    SELECT shard FROM {LEASE} WHERE owner = %(me)s AND expires_at > now()
    ORDER BY shard FOR UPDATE
)
RETURNING shard, epoch
"""

_RELEASE = f"""
UPDATE {LEASE} SET owner = NULL, expires_at = NULL
WHERE shard IN (
    SELECT shard FROM {LEASE} WHERE owner = %(me)s AND shard = ANY(%(shards)s)
    ORDER BY shard FOR UPDATE
)
"""

_CLAIM = f"""
UPDATE {LEASE} SET owner = %(me)s, epoch = epoch + 1,
       expires_at = now() + make_interval(secs => %(ttl)s)
WHERE shard IN (
    SELECT shard FROM {LEASE}
    WHERE owner IS NULL OR expires_at IS NULL OR expires_at <= now()
    ORDER BY shard
    LIMIT %(wanted)s
    FOR UPDATE SKIP LOCKED
)
RETURNING shard, epoch
"""

_LEAVE = f"DELETE FROM {MEMBER} WHERE relay_id = %(me)s"

# Held by the lease connection for the relay's life: a second live process
# with the same relay id cannot take it. Session-level, so it goes with the
# connection (a crashed relay's lock is gone when its session is).
_LOCK_RELAY_ID = "SELECT pg_try_advisory_lock(hashtextextended('outbox-relay-id:' || %s, 0))"

# The fence: rows are deleted only for shards this relay still owns, with the
# epoch it was granted, before expiry. FOR SHARE makes a concurrent claim of
# those shards wait until this delete has committed. The ids come as one
# comma-separated string: psycopg dumps a list element by element in Python
# (about 1.4 ms for a batch of 500, on the relay's one busy thread), a join
# takes microseconds, and canonical UUID text has no commas.
_DELETE_PUBLISHED_FENCED = f"""
WITH held AS (
    SELECT l.shard FROM {LEASE} l
    JOIN unnest(%(shards)s::smallint[], %(epochs)s::bigint[]) AS mine(shard, epoch)
      ON mine.shard = l.shard AND mine.epoch = l.epoch
    WHERE l.owner = %(me)s AND l.expires_at > now()
    ORDER BY l.shard
    FOR SHARE OF l
), published AS (
    DELETE FROM {EVENT}
    WHERE id = ANY(string_to_array(%(ids)s, ',')::uuid[]) AND shard IN (SELECT shard FROM held)
    RETURNING shard
), counted AS (
    UPDATE {COUNTER} SET value = value + (SELECT count(*) FROM published)
    WHERE name = %(counter)s
), recent AS (
    -- m per {RATE_BUCKET_SECONDS} s, the history behind `outbox stats`' publishing rate;
    -- one row per bucket, the buckets older than 10 minutes pruned (their names sort by time).
    INSERT INTO {COUNTER} (name, value)
    SELECT %(bucket_prefix)s || (floor(extract(epoch FROM now()) / {RATE_BUCKET_SECONDS})
                                 * {RATE_BUCKET_SECONDS})::bigint, count(*)
    FROM published HAVING count(*) > 0
    ON CONFLICT (name) DO UPDATE SET value = {COUNTER}.value + excluded.value
), pruned AS (
    DELETE FROM {COUNTER}
    WHERE name LIKE %(bucket_prefix)s || '%%'
      AND name < %(bucket_prefix)s || (floor(extract(epoch FROM now())) - 600)::bigint
)
SELECT shard, count(*) FROM published GROUP BY shard
"""

# The columns of `Row`, in its order. to_char matches format_time's
# isoformat(timespec="microseconds") to the character, whatever the session's
# TimeZone; tests/integration/test_relay.py checks that they agree.
_FETCH_SHARDS = f"""
SELECT id::text, topic, key, type, payload, content_type, headers::text,
       to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
FROM {EVENT}
WHERE position IS NOT NULL AND shard = ANY(%s)
ORDER BY position
LIMIT %s
"""


# The same, without the events already in flight in the relay's window
# (relay/window.py), passed as one comma-separated string like the delete's
# ids. They are the oldest rows, so the scan still starts at the head of the
# position index and skips them with one hash probe each.
_FETCH_SHARDS_EXCLUDING = _FETCH_SHARDS.replace(
    "ORDER BY position",
    "  AND id <> ALL(string_to_array(%s, ',')::uuid[])\nORDER BY position",
)


def heartbeat(
    conn: psycopg.Connection[Any], me: str, *, ttl: float, wanted_total: int
) -> tuple[dict[int, int], int]:
    """One lease round in one transaction: say we're alive, renew what we own,
    give back shards above our fair share, claim free or expired ones up to it.

    Returns ({shard: epoch} now owned, number of live relays).
    """
    params = {"me": me, "ttl": ttl}
    with conn.transaction():
        conn.execute(_HEARTBEAT, params)
        conn.execute(_FORGET_DEAD_MEMBERS, params)
        row = conn.execute(_LIVE_MEMBERS).fetchone()
        live = max(int(row[0]) if row else 1, 1)
        fair = -(-wanted_total // live)  # ceil
        owned = dict(conn.execute(_RENEW, params).fetchall())
        if len(owned) > fair:
            extra = sorted(owned)[fair:]
            conn.execute(_RELEASE, {**params, "shards": extra})
            for shard in extra:
                del owned[shard]
        elif len(owned) < fair:
            claimed = conn.execute(_CLAIM, {**params, "wanted": fair - len(owned)}).fetchall()
            owned.update(dict(claimed))
    return owned, live


def lock_relay_id(conn: psycopg.Connection[Any], me: str) -> bool:
    """Take this relay id's lock for the session; False when another session holds it."""
    row = conn.execute(_LOCK_RELAY_ID, (me,)).fetchone()
    return bool(row and row[0])


def leave(conn: psycopg.Connection[Any], me: str, shards: Sequence[int]) -> None:
    """Give back every lease at once, so the others need not wait for expiry."""
    with conn.transaction():
        conn.execute(_RELEASE, {"me": me, "shards": list(shards)})
        conn.execute(_LEAVE, {"me": me})


def fetch_shards(
    conn: psycopg.Connection[Any], shards: Sequence[int], limit: int, *, excluding: str = ""
) -> list[Row]:
    """The oldest committed events of the given shards, in position order,
    leaving out the ids in `excluding` (comma-separated, as `InFlight.ids` gives them)."""
    # Binary results: the payload arrives as its bytes, not as hex to decode.
    with conn.cursor(binary=True, row_factory=args_row(Row)) as cur:
        if excluding:
            cur.execute(_FETCH_SHARDS_EXCLUDING, (list(shards), excluding, limit), prepare=True)
        else:
            cur.execute(_FETCH_SHARDS, (list(shards), limit), prepare=True)
        return cur.fetchall()


def delete_published_fenced(
    conn: psycopg.Connection[Any], me: str, ids: Sequence[str], leases: dict[int, int]
) -> int:
    """Delete acknowledged events of shards still leased to `me` at the same epoch.

    Returns how many rows were deleted; rows of lost shards stay for their new owner.
    """
    if not ids:
        return 0
    shards = sorted(leases)
    rows = conn.execute(
        _DELETE_PUBLISHED_FENCED,
        {
            "me": me, "ids": ",".join(ids), "shards": shards,
            "epochs": [leases[s] for s in shards], "counter": PUBLISHED_COUNTER,
            "bucket_prefix": PUBLISHED_BUCKET_PREFIX,
        },
        prepare=True,
    ).fetchall()
    return sum(int(count) for _, count in rows)
