"""Least privilege: the GRANTs that let the writer, the relay and a consumer each
do its own job on the kit's tables, and nothing else (`outbox db grants`).

    writer    INSERT into outbox_event (and the sequence behind write_seq). Nothing
              else: it cannot read, change or delete an event, nor touch the inbox.
              The commit trigger that numbers its rows reads and updates
              outbox_event, so its function is made SECURITY DEFINER (it runs as
              the tables' owner, with search_path pinned to the kit's schema and
              pg_temp last, so no object a writer creates can stand in for one
              of the kit's).
    relay     reads, counts attempts on and deletes outbox_event, parks into
              outbox_parked, bumps outbox_counter (m and its rate buckets), holds its leases
              (outbox_relay_lease, outbox_relay_member). No inbox, no dead letters.
    consumer  its inbox (claim, look up, un-claim) and dead letters (park). No
              outbox table: a handler that publishes follow-up events needs the
              writer's grants as well (give the role both).

The relay and the consumer also read the kit's revision (outbox_alembic_version).
What is not granted is refused by PostgreSQL ("permission denied"), which
`tests/integration/test_db_grants.py` shows for each role. The operations
commands (`outbox parked replay`, `dead-letters`, `inbox purge`, `db upgrade`)
stay with the tables' owner or a DBA.

Run it as the owner of the kit's tables (the role that ran `outbox db upgrade`),
again after a migration that recreates the commit trigger's function. GRANT is
idempotent; nothing is revoked, so a role's own extra rights stay.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import DBAPIError

from outbox.errors import ConfigError, OutboxError, first_line
from outbox.schema import (
    VERSION_TABLE,
    outbox_counter,
    outbox_dead_letter,
    outbox_event,
    outbox_inbox,
    outbox_parked,
    outbox_relay_lease,
    outbox_relay_member,
    write_seq,
)

TRIGGER_FUNCTION = "outbox_assign_positions()"

# (privileges, table) per role kind; column lists where the role needs no more.
_WRITER = [("INSERT", outbox_event.name)]
_RELAY = [
    ("SELECT", VERSION_TABLE),  # both check the schema's revision at start
    ("SELECT, DELETE, UPDATE (attempts, last_error)", outbox_event.name),
    ("SELECT, INSERT", outbox_parked.name),  # SELECT: the backlog gauges count parked events
    # m, and its 10-second buckets behind the publish rate (made and pruned by the delete)
    ("SELECT, INSERT, UPDATE, DELETE", outbox_counter.name),
    ("SELECT, UPDATE", outbox_relay_lease.name),
    ("SELECT, INSERT, UPDATE, DELETE", outbox_relay_member.name),
]
_CONSUMER = [
    ("SELECT", VERSION_TABLE),
    ("SELECT, INSERT, DELETE", outbox_inbox.name),
    ("SELECT, INSERT", outbox_dead_letter.name),
]
KIT_TABLES = (outbox_event.name, outbox_parked.name, outbox_counter.name, outbox_relay_lease.name,
              outbox_relay_member.name, outbox_inbox.name, outbox_dead_letter.name, VERSION_TABLE)


_PREPARER = postgresql.dialect().identifier_preparer  # type: ignore[no-untyped-call]


@dataclass(frozen=True)
class Roles:
    writer: str | None = None
    relay: str | None = None
    consumer: str | None = None

    def named(self) -> list[str]:
        return sorted({r for r in (self.writer, self.relay, self.consumer) if r})


def quote(name: str) -> str:
    """A role or schema name as an SQL identifier (quoted when it needs to be)."""
    if not name or "\x00" in name:
        raise ConfigError("role", f"{name!r} is not a role name")
    return str(_PREPARER.quote(name))


def grant_statements(roles: Roles, schema: str = "public") -> list[str]:
    """The statements, in order, that give each named role its side and no more."""
    if not roles.named():
        raise ConfigError("outbox db grants", "name at least one of --writer, --relay, --consumer")
    s = quote(schema)
    out: list[str] = []

    def give(role: str, grants: Sequence[tuple[str, str]]) -> None:
        r = quote(role)
        out.append(f"GRANT USAGE ON SCHEMA {s} TO {r};")
        out.extend(f"GRANT {privileges} ON {s}.{table} TO {r};" for privileges, table in grants)

    if roles.writer:
        give(roles.writer, _WRITER)
        out.append(f"GRANT USAGE ON SEQUENCE {s}.{write_seq.name} TO {quote(roles.writer)};")
        out.append(f"ALTER FUNCTION {s}.{TRIGGER_FUNCTION} SECURITY DEFINER SET search_path = {s}, pg_temp;")
    if roles.relay:
        give(roles.relay, _RELAY)
    if roles.consumer:
        give(roles.consumer, _CONSUMER)
    return out


def apply_grants(conn: Connection, roles: Roles, schema: str = "public") -> list[str]:
    """Check the database is the kit's and the roles exist, then run the grants in
    `conn`'s transaction. Raises one-line `ConfigError` / `OutboxError` otherwise."""
    statements = grant_statements(roles, schema)
    missing_tables = [t for t in KIT_TABLES if conn.execute(
        text("SELECT to_regclass(:name) IS NULL"), {"name": f"{quote(schema)}.{t}"}).scalar_one()]
    if missing_tables:
        raise OutboxError(
            f"this database has none of the kit's tables {', '.join(missing_tables)} in schema "
            f"{schema}: run `outbox db upgrade` first (or pass the right --database-url / --schema)")
    absent = [r for r in roles.named() if not conn.execute(
        text("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :r)"), {"r": r}).scalar_one()]
    if absent:
        raise ConfigError("outbox db grants", (
            f"role(s) {', '.join(absent)} do not exist; create them first "
            "(CREATE ROLE name LOGIN PASSWORD ...), then run this again"))
    who = conn.execute(text("SELECT current_user")).scalar_one()
    try:
        for statement in statements:
            conn.execute(text(statement))
    except DBAPIError as exc:
        if str(getattr(exc.orig, "sqlstate", "")) == "42501":  # insufficient_privilege
            raise OutboxError(
                f"role {who} may not grant on the kit's tables ({first_line(exc.orig)}): run "
                "`outbox db grants` as their owner, the role that ran `outbox db upgrade`") from None
        raise
    return statements
