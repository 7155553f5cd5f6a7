"""Tables of the two example services. Each service owns its own PostgreSQL
schema; neither reads the other's tables (only the end-of-run invariant
check looks at both)."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Engine,
    Identity,
    Integer,
    MetaData,
    Table,
    Text,
    UniqueConstraint,
    Uuid,
    func,
    text,
)

payments_metadata = MetaData(schema="payments")
ledger_metadata = MetaData(schema="ledger")

payment = Table(
    "payment",
    payments_metadata,
    Column("id", Uuid, primary_key=True),
    Column("idempotency_key", Text, nullable=False, unique=True),
    Column("merchant", Text, nullable=False),
    Column("amount_minor", BigInteger, nullable=False),
    Column("currency", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("version", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

# One row per posting leg. A captured payment posts two legs (debit cash,
# credit merchant payable); a refund posts the two reverse legs.
entry = Table(
    "entry",
    ledger_metadata,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column("payment_id", Uuid, nullable=False, index=True),
    Column("event_id", Uuid, nullable=False),
    Column("kind", Text, nullable=False),  # capture | refund
    Column("account", Text, nullable=False),
    Column("debit_minor", BigInteger, nullable=False),
    Column("credit_minor", BigInteger, nullable=False),
    Column("currency", Text, nullable=False),
    Column("posted_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # The inbox already makes this impossible; the constraint makes the
    # ledger's own promise checkable: a payment posts each kind once.
    UniqueConstraint("payment_id", "kind", "account", name="entry_once"),
)

# Every payment event the ledger applied, in the order it applied them: the
# evidence for the per-payment order invariant and for the latency figures.
applied_event = Table(
    "applied_event",
    ledger_metadata,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column("payment_id", Uuid, nullable=False, index=True),
    Column("event_id", Uuid, nullable=False, unique=True),
    Column("type", Text, nullable=False),
    Column("version", Integer, nullable=False),
    Column("event_time", DateTime(timezone=True), nullable=False),
    Column("applied_at", DateTime(timezone=True), nullable=False,
           server_default=text("clock_timestamp()")),
)


def create_tables(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text("CREATE SCHEMA IF NOT EXISTS payments"))
        conn.execute(text("CREATE SCHEMA IF NOT EXISTS ledger"))
        payments_metadata.create_all(conn)
        ledger_metadata.create_all(conn)


def reset_tables(engine: Engine) -> None:
    """Empty both services' tables and the kit's, for a fresh demo run."""
    with engine.begin() as conn:
        conn.execute(text(
            "TRUNCATE payments.payment, ledger.entry, ledger.applied_event,"
            " outbox_event, outbox_parked, outbox_inbox, outbox_dead_letter"
        ))
        conn.execute(text("UPDATE outbox_counter SET value = 0"))
