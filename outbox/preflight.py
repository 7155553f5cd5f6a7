"""What the consuming side checks before it touches a message: a database it can use.

    check_consumer_database(engine)   once, before the consumer's first poll
    login_refused(exc)                 does this connection error say "wrong", not "down"?
    kit_statement(what)                the kit's own statements: a missing table is a SchemaError

A database that is wrong stays wrong however long one waits, and every
message the consumer read meanwhile would fail for it; a database that is
down comes back. So the two are told apart, and only the second is waited
out:

    wrong (raised at once, one line, no secret, no payload)
        ConfigError  the login is refused: password, user, database name, pg_hba, TLS;
                     the role may not read or write the inbox or the dead letters
        SchemaError  the kit's tables are missing, or older than this kit
    down (the caller waits and tries again; nothing is dead-lettered)
        any other error while connecting: refused connection, timeout, server starting up

A revision this kit does not know (the database was migrated by a newer
kit) is accepted when the tables have every column this kit uses: a rolling
upgrade migrates first and deploys after.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources

from sqlalchemy import Connection, Engine, select, text
from sqlalchemy.exc import DBAPIError

from outbox.config import safe_url
from outbox.errors import ConfigError, KitStatementError, SchemaError, first_line, login_refused
from outbox.schema import VERSION_TABLE, outbox_dead_letter, outbox_inbox

__all__ = ["KitStatementError", "check_consumer_database", "kit_statement", "login_refused"]

log = logging.getLogger(__name__)

_UPGRADE = "run `outbox db upgrade` against this database"

# SQLSTATEs that mean the kit's tables are not what this kit expects (or the
# role may not use them): a statement of the kit's own that fails with one of
# these is no message's fault and is never dead-lettered.
_SCHEMA_SQLSTATES = {
    "42P01": "a table is missing",  # undefined_table
    "42703": "a column is missing",  # undefined_column
    "42501": "permission denied",  # insufficient_privilege
    "42883": "a function or operator is missing",  # undefined_function
}

# What the consumer does to each table, checked once at the start.
_PRIVILEGES = {
    outbox_inbox.name: ("SELECT", "INSERT", "DELETE"),
    outbox_dead_letter.name: ("SELECT", "INSERT"),
}


def check_consumer_database(engine: Engine) -> None:
    """Raise `ConfigError` or `SchemaError` unless the consumer can work with this database.

    Checks that the login is accepted, that the kit's tables are at this
    kit's revision (or a newer one) with every column the consumer uses, and
    that the role may read and write them. Any other error while connecting
    (the database is down) is raised as the driver raised it, for the caller
    to wait out.
    """
    where = safe_url(engine.url.render_as_string(hide_password=False))
    try:
        conn = engine.connect()
    except DBAPIError as exc:
        reason = login_refused(exc)
        if reason is not None:
            raise ConfigError("database", (
                f"{where} refuses the consumer's login ({reason}); check the URL the engine was "
                "made from (OUTBOX_DATABASE_URL), its user, password, database name and TLS settings"
            )) from None
        raise
    with conn:
        _check_revision(conn, where)
        _check_tables(conn, where)
        _check_privileges(conn, where)


@contextmanager
def kit_statement(what: str) -> Iterator[None]:
    """Turn a schema or permission failure of one of the kit's own statements into `SchemaError`."""
    try:
        yield
    except DBAPIError as exc:
        problem = _SCHEMA_SQLSTATES.get(_sqlstate(exc))
        if problem is None:
            raise
        raise KitStatementError(
            f"{what} failed, {problem} ({first_line(exc.orig)}): the kit's tables are missing, "
            f"older than the kit or not usable by this role; {_UPGRADE}"
        ) from None


def _sqlstate(exc: DBAPIError) -> str:
    return str(getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None) or "")


def _check_revision(conn: Connection, where: str) -> None:
    from alembic.script import ScriptDirectory

    # Read directly, not through Alembic's MigrationContext, which logs at INFO on every start.
    has_versions = conn.execute(
        text("SELECT to_regclass(:table) IS NOT NULL"), {"table": VERSION_TABLE}
    ).scalar_one()
    heads = (
        list(conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars())
        if has_versions else []
    )
    script = ScriptDirectory(str(resources.files("outbox._migrations")))
    head = script.get_current_head()
    known = {revision.revision for revision in script.walk_revisions()}
    if not heads:
        raise SchemaError(f"{where} has none of the kit's tables (no {VERSION_TABLE}); {_UPGRADE}")
    current = heads[0]
    if current == head:
        return
    if current in known:
        raise SchemaError(
            f"{where} is at revision {current}, older than this kit ({head}): the consumer's "
            f"tables are missing or incomplete; {_UPGRADE}"
        )
    log.warning(
        "database is at revision %s, which this kit (head %s) does not know; a newer kit migrated "
        "it: the consumer goes on if the tables have every column it uses", current, head,
    )


def _check_tables(conn: Connection, where: str) -> None:
    for table in (outbox_inbox, outbox_dead_letter):
        try:
            with conn.begin_nested():
                conn.execute(select(table).limit(0))
        except DBAPIError as exc:
            if _sqlstate(exc) not in _SCHEMA_SQLSTATES:
                raise  # e.g. the connection dropped: an outage, for the caller to wait out
            raise SchemaError(
                f"{where}: table {table.name} is missing or lacks a column the consumer uses "
                f"({first_line(exc.orig)}); {_UPGRADE}"
            ) from None


def _check_privileges(conn: Connection, where: str) -> None:
    # One privilege per call: has_table_privilege('t', 'SELECT, INSERT') is true if ANY is held.
    wanted = [(table, privilege) for table, privileges in _PRIVILEGES.items()
              for privilege in privileges]
    calls = ", ".join(f"has_table_privilege(:t{i}, :p{i})" for i in range(len(wanted)))
    params = {}
    for i, (table, privilege) in enumerate(wanted):
        params[f"t{i}"], params[f"p{i}"] = table, privilege
    user, *held = conn.execute(text(f"SELECT current_user, {calls}"), params).one()
    missing = [f"{privilege} on {table}" for (table, privilege), ok in zip(wanted, held, strict=True)
               if not ok]
    if missing:
        raise ConfigError("database", (
            f"role {user} lacks {', '.join(missing)} in {where}; grant them to the consumer's role"
        ))
