"""The consuming side: the inbox that makes effects happen once, and dead letters.

Revision ID: 0002_inbox
Revises: 0001_outbox
Create Date: 2026-11-26

`outbox_inbox` has one row per (consumer group, event id) the group applied;
its primary key is the deduplication. `outbox_dead_letter` keeps messages a
consumer could not apply, with everything needed to replay them.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002_inbox"
down_revision: str | None = "0001_outbox"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Dropped by `downgrade()`, which refuses while they hold rows (outbox.migrate.refuse_data_loss):
# without the inbox, redelivered events would be applied a second time.
DROPS_DATA = ("outbox_inbox", "outbox_dead_letter")


def upgrade() -> None:
    op.create_table(
        "outbox_inbox",
        sa.Column("consumer_group", sa.Text(), primary_key=True),
        sa.Column("event_id", sa.Uuid(), primary_key=True),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("partition", sa.Integer(), nullable=False),
        sa.Column("offset", sa.BigInteger(), nullable=False),
        sa.Column(
            "processed_at", sa.DateTime(timezone=True), nullable=False,
            server_default=sa.func.now(),
        ),
    )
    op.create_index("outbox_inbox_processed_at_idx", "outbox_inbox", ["processed_at"])
    op.create_table(
        "outbox_dead_letter",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), primary_key=True),
        sa.Column("consumer_group", sa.Text(), nullable=False),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("partition", sa.Integer(), nullable=False),
        sa.Column("offset", sa.BigInteger(), nullable=False),
        sa.Column("event_id", sa.Uuid(), nullable=True),
        sa.Column("key", sa.LargeBinary(), nullable=True),
        sa.Column("value", sa.LargeBinary(), nullable=True),
        sa.Column("headers", postgresql.JSONB(), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column(
            "parked_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("replayed_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index(
        "outbox_dead_letter_group_idx", "outbox_dead_letter", ["consumer_group", "replayed_at"]
    )


def downgrade() -> None:
    from outbox.migrate import refuse_data_loss

    refuse_data_loss(op, DROPS_DATA, revision)
    op.drop_table("outbox_dead_letter")
    op.drop_table("outbox_inbox")
