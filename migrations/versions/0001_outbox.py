"""The outbox: events waiting for the relay, parked events, counters, relay leases.

Revision ID: 0001_outbox
Revises:
Create Date: 2026-11-26

The commit-order trigger is the heart of the ordering guarantee. A bigserial
or a transaction id is *not* commit order: transaction A can take id 1, B id
2, and B commit first. So every row is inserted with `position` NULL, and a
deferred constraint trigger, which PostgreSQL runs at COMMIT, numbers the
transaction's rows from a sequence while holding a transaction-scoped
advisory lock on the commit-lock bucket of each of their keys (a hash of the
key; COMMIT_LOCK_BUCKETS of them). Two transactions with a common key
therefore take their numbers one after the other, each after the previous one
is committed and visible, and for one key `position` order is commit order.
The lock is held only from the start of COMMIT until it completes, not while
the business transaction runs. Buckets rather than keys, so that a
transaction publishing thousands of keys takes at most COMMIT_LOCK_BUCKETS
locks and never exhausts the lock table (max_locks_per_transaction); buckets
are locked in sorted order, so transactions sharing several cannot deadlock.
A relay shard is a union of buckets (bucket & (SHARDS - 1)).

The trigger also sends one NOTIFY per transaction, a wake-up hint for the
relay. `SET outbox.notify = off` (per session, role or database) turns it off
for writers that prefer the relay's polling alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001_outbox"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = ("outbox",)
depends_on: str | Sequence[str] | None = None

KEY_LOCK_NAMESPACE = 0x6F757462
SHARDS = 16
COMMIT_LOCK_BUCKETS = 64  # at most this many advisory locks per committing transaction
# Tables whose rows are events or state that cannot be rebuilt: `downgrade()`
# refuses to drop them while they hold rows (outbox.migrate.refuse_data_loss).
# The counter, leases and members are rebuilt by an upgrade.
DROPS_DATA = ("outbox_event", "outbox_parked")

ASSIGN_POSITIONS = f"""
CREATE FUNCTION outbox_assign_positions() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    me bigint := txid_current();
    r record;
BEGIN
    -- Every row this transaction inserted fires the trigger at COMMIT; the
    -- first firing numbers all of them, and each later one sees with one
    -- primary-key lookup that its row is numbered already (a scan for
    -- "anything pending" here would make big transactions quadratic).
    IF (SELECT position FROM outbox_event WHERE id = NEW.id) IS NOT NULL THEN
        RETURN NULL;
    END IF;
    FOR r IN
        SELECT DISTINCT hashtext(key) & {COMMIT_LOCK_BUCKETS - 1} AS k FROM outbox_event
        WHERE xact_id = me AND position IS NULL ORDER BY 1
    LOOP
        PERFORM pg_advisory_xact_lock({KEY_LOCK_NAMESPACE}, r.k);
    END LOOP;
    FOR r IN
        SELECT id FROM outbox_event
        WHERE xact_id = me AND position IS NULL ORDER BY write_seq
    LOOP
        UPDATE outbox_event SET position = nextval('outbox_event_position_seq')
        WHERE id = r.id;
    END LOOP;
    IF coalesce(current_setting('outbox.notify', true), '') <> 'off' THEN
        PERFORM pg_notify('outbox_event', '');
    END IF;
    RETURN NULL;
END
$$;
"""


def upgrade() -> None:
    op.execute("CREATE SEQUENCE outbox_event_write_seq")
    op.execute("CREATE SEQUENCE outbox_event_position_seq")
    op.create_table(
        "outbox_event",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column(
            "write_seq", sa.BigInteger(), nullable=False,
            server_default=sa.text("nextval('outbox_event_write_seq')"),
        ),
        sa.Column(
            "xact_id", sa.BigInteger(), nullable=False, server_default=sa.text("txid_current()")
        ),
        sa.Column("position", sa.BigInteger(), nullable=True),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column(
            "shard", sa.SmallInteger(), sa.Computed(f"(hashtext(key) & {SHARDS - 1})::smallint", persisted=True),
            nullable=False,
        ),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("content_type", sa.Text(), nullable=False),
        sa.Column(
            "headers", postgresql.JSONB(), nullable=False, server_default=sa.text("'{}'::jsonb")
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("last_error", sa.Text(), nullable=True),
    )
    op.execute("ALTER SEQUENCE outbox_event_write_seq OWNED BY outbox_event.write_seq")
    op.execute("ALTER SEQUENCE outbox_event_position_seq OWNED BY outbox_event.position")
    op.create_index(
        "outbox_event_position_idx", "outbox_event", ["position"], unique=True,
        postgresql_where=sa.text("position IS NOT NULL"),
    )
    op.create_index(
        "outbox_event_pending_idx", "outbox_event", ["xact_id"],
        postgresql_where=sa.text("position IS NULL"),
    )
    op.execute(ASSIGN_POSITIONS)
    op.execute(
        "CREATE CONSTRAINT TRIGGER outbox_event_assign_position"
        " AFTER INSERT ON outbox_event DEFERRABLE INITIALLY DEFERRED"
        " FOR EACH ROW EXECUTE FUNCTION outbox_assign_positions()"
    )

    op.create_table(
        "outbox_parked",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("content_type", sa.Text(), nullable=False),
        sa.Column("headers", postgresql.JSONB(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column(
            "parked_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
    )
    op.create_table(
        "outbox_counter",
        sa.Column("name", sa.Text(), primary_key=True),
        sa.Column("value", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
    )
    op.execute("INSERT INTO outbox_counter (name, value) VALUES ('published', 0)")

    # Relays share the work by key shard: each shard is leased to one relay at a
    # time; `epoch` grows with every change of owner and fences the old one.
    op.create_table(
        "outbox_relay_lease",
        sa.Column("shard", sa.SmallInteger(), primary_key=True),
        sa.Column("owner", sa.Text(), nullable=True),
        sa.Column("epoch", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.execute(
        f"INSERT INTO outbox_relay_lease (shard) SELECT generate_series(0, {SHARDS - 1})"
    )
    op.create_table(
        "outbox_relay_member",
        sa.Column("relay_id", sa.Text(), primary_key=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    from outbox.migrate import refuse_data_loss

    refuse_data_loss(op, DROPS_DATA, revision)
    op.drop_table("outbox_relay_member")
    op.drop_table("outbox_relay_lease")
    op.drop_table("outbox_counter")
    op.drop_table("outbox_parked")
    op.execute("DROP TRIGGER outbox_event_assign_position ON outbox_event")
    op.execute("DROP FUNCTION outbox_assign_positions()")
    op.drop_table("outbox_event")
