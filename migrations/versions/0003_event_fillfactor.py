"""Leave half of each outbox page free, so the commit trigger's update stays on its page.

Revision ID: 0003_event_fillfactor
Revises: 0002_inbox
Create Date: 2026-12-02

The commit trigger (0001_outbox) writes each row twice: the INSERT with
`position` NULL, then at COMMIT an UPDATE that numbers it. A transaction of
many events fills whole pages with its INSERTs, so every UPDATE found its
page full: PostgreSQL locked the old version (a Heap/LOCK record), put the
new one on another page and logged the whole new tuple. With room left on the
page, the new version stays beside the old one and is logged as the bytes
that changed. Measured with pg_walinspect (`python -m bench --only wal`),
transactions of 500 events of 200 bytes: 1,112 KiB of WAL per 1,000 events
before, 760 after; of 4 events 859 and 767; one event per transaction mostly
found room already (807 and 792).

While the relay keeps up the table hardly grows for it (the old versions
filled pages of their own before, dead until vacuum, and the relay deletes
the rows soon after); a backlog that builds up while nothing is published
takes up to twice the pages. Only later INSERTs follow the setting;
ALTER TABLE ... SET (fillfactor) takes a SHARE UPDATE EXCLUSIVE lock, which
writers, the relay and autovacuum do not wait for beyond the catalog change.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0003_event_fillfactor"
down_revision: str | None = "0002_inbox"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

EVENT_FILLFACTOR = 50  # percent of a page INSERTs may fill; outbox/schema.py says the same


def upgrade() -> None:
    op.execute(f"ALTER TABLE outbox_event SET (fillfactor = {EVENT_FILLFACTOR})")


def downgrade() -> None:
    op.execute("ALTER TABLE outbox_event RESET (fillfactor)")
