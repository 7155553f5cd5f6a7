"""The kit's tables, as SQLAlchemy Core tables (and one ORM mapping for the write path).

The migrations in `migrations/versions/` create exactly these; `outbox db check`
compares the two. The relay, the consumer and the CLI read these definitions;
none of them spells a table name as a string.

outbox_event
    One row per committed-but-unpublished event. `write_seq` orders the events
    of one transaction (the order of the `publish` calls). `position` is NULL
    until the transaction commits: a deferred trigger (see
    `migrations/versions/0001_outbox.py`) assigns it from a sequence at COMMIT
    while holding a per-key advisory lock, so for one key `position` order *is*
    commit order. The relay publishes in `position` order and deletes a row
    once the broker acknowledged it, so the table holds only the backlog.
outbox_parked
    Events the relay gave up on (for example larger than the broker accepts),
    with the error. `outbox parked replay` moves them back into outbox_event.
outbox_counter
    Monotonic counters; `published` is m in the backlog formula Q = n - m;
    `published@<unix time>` rows count m per 10 s for the last 10 minutes.
outbox_relay_lease, outbox_relay_member
    Which relay owns which key shard, until when, and with which epoch
    (see relay/leases.py); the relays alive.
outbox_inbox
    Event ids a consumer group has applied; the unique key is what makes
    effects happen once.
outbox_dead_letter
    Messages a consumer could not apply (handler kept failing, or the message
    was malformed), with payload, headers and error, for replay.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Computed,
    DateTime,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Sequence,
    SmallInteger,
    Table,
    Text,
    Uuid,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import registry

metadata = MetaData()

# Advisory-lock namespace (first argument of the two-int pg_advisory_xact_lock)
# the commit trigger uses for per-key locks, so they never meet a host
# application's own advisory locks. The bytes spell "outb".
KEY_LOCK_NAMESPACE = 0x6F757462

# Keys are spread over this many shards; relays lease shards, so at most
# SHARDS relays do useful work at once. Changing it needs a migration.
SHARDS = 16

NOTIFY_CHANNEL = "outbox_event"
PUBLISHED_COUNTER = "published"
# The relay also counts m per RATE_BUCKET_SECONDS in outbox_counter rows named
# "published@<unix time of the bucket's start>", kept 10 minutes: the history
# behind the publishing rate `outbox stats` shows, with no table of its own.
PUBLISHED_BUCKET_PREFIX = "published@"
RATE_BUCKET_SECONDS = 10
# Alembic's record of the kit's revision, apart from a host application's own
# alembic_version (outbox.migrate and migrations/env.py both read it here).
VERSION_TABLE = "outbox_alembic_version"

write_seq = Sequence("outbox_event_write_seq", metadata=metadata)
position_seq = Sequence("outbox_event_position_seq", metadata=metadata)

outbox_event = Table(
    "outbox_event",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("write_seq", BigInteger, nullable=False, server_default=write_seq.next_value()),
    Column("xact_id", BigInteger, nullable=False, server_default=text("txid_current()")),
    Column("position", BigInteger, nullable=True),
    Column("topic", Text, nullable=False),
    Column("key", Text, nullable=False),
    # Which relay shard the key belongs to; one relay at a time owns a shard.
    Column("shard", SmallInteger, Computed(f"(hashtext(key) & {SHARDS - 1})::smallint", persisted=True),
           nullable=False),
    Column("type", Text, nullable=False),
    Column("payload", LargeBinary, nullable=False),
    Column("content_type", Text, nullable=False),
    Column("headers", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("last_error", Text, nullable=True),
    Index(
        "outbox_event_position_idx", "position", unique=True,
        postgresql_where=text("position IS NOT NULL"),
    ),
    Index("outbox_event_pending_idx", "xact_id", postgresql_where=text("position IS NULL")),
    # Room on each page for the commit trigger's UPDATE of the same row
    # (migrations/versions/0003_event_fillfactor.py says why and what it saves).
    postgresql_with={"fillfactor": 50},
)

outbox_parked = Table(
    "outbox_parked",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("topic", Text, nullable=False),
    Column("key", Text, nullable=False),
    Column("type", Text, nullable=False),
    Column("payload", LargeBinary, nullable=False),
    Column("content_type", Text, nullable=False),
    Column("headers", JSONB, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("position", BigInteger, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("error", Text, nullable=False),
    Column("parked_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

outbox_counter = Table(
    "outbox_counter",
    metadata,
    Column("name", Text, primary_key=True),
    Column("value", BigInteger, nullable=False, server_default=text("0")),
)

outbox_relay_lease = Table(
    "outbox_relay_lease",
    metadata,
    Column("shard", SmallInteger, primary_key=True, autoincrement=False),
    Column("owner", Text, nullable=True),
    Column("epoch", BigInteger, nullable=False, server_default=text("0")),
    Column("expires_at", DateTime(timezone=True), nullable=True),
)

outbox_relay_member = Table(
    "outbox_relay_member",
    metadata,
    Column("relay_id", Text, primary_key=True),
    Column("heartbeat_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
)

outbox_inbox = Table(
    "outbox_inbox",
    metadata,
    Column("consumer_group", Text, primary_key=True),
    Column("event_id", Uuid, primary_key=True),
    Column("topic", Text, nullable=False),
    Column("partition", Integer, nullable=False),
    Column("offset", BigInteger, nullable=False),
    Column("processed_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("outbox_inbox_processed_at_idx", "processed_at"),
)

outbox_dead_letter = Table(
    "outbox_dead_letter",
    metadata,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column("consumer_group", Text, nullable=False),
    Column("topic", Text, nullable=False),
    Column("partition", Integer, nullable=False),
    Column("offset", BigInteger, nullable=False),
    Column("event_id", Uuid, nullable=True),
    Column("key", LargeBinary, nullable=True),
    Column("value", LargeBinary, nullable=True),
    Column("headers", JSONB, nullable=False),
    Column("error", Text, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("parked_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("replayed_at", DateTime(timezone=True), nullable=True),
    Index("outbox_dead_letter_group_idx", "consumer_group", "replayed_at"),
)


class OutboxRow:
    """ORM mapping of `outbox_event`, so `publish` works through `session.add`
    on a sync `Session` and an `AsyncSession` alike. Only the write path uses it."""

    id: uuid.UUID
    topic: str
    key: str
    type: str
    payload: bytes
    content_type: str
    headers: dict[str, str]
    created_at: datetime

    def __init__(self, **values: Any) -> None:
        for name, value in values.items():
            setattr(self, name, value)


_registry = registry(metadata=metadata)
_registry.map_imperatively(
    OutboxRow,
    outbox_event,
    # The relay deletes rows the moment they are published; the ORM must never
    # try to reload or version them after the writer's commit.
    eager_defaults=False,
)
