"""Alembic environment for the outbox kit.

Works three ways: from `outbox db ...` (the URL arrives as the config's
`sqlalchemy.url`, set by outbox.migrate), from plain `alembic -c alembic.ini`
(the URL comes from OUTBOX_DATABASE_URL), and inside a host application's
Alembic via `version_locations` (then the host's env.py runs instead of this
one and the host decides the version table; see the README).

Only the kit's own tables are compared by `check`, so a host application's
tables in the same database never make it fail.

Online runs take a transaction-scoped advisory lock before Alembic reads the
version table: replicas that all run `outbox db upgrade` at start-up take
turns (the first migrates, the others then find the database at head)
instead of racing to create the same tables and types.
"""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy import Connection, create_engine, pool, text

from outbox.config import database_url
from outbox.schema import VERSION_TABLE, metadata

# pg_advisory_xact_lock(namespace, key) for migrations. A namespace of its own
# ("outm"), so it never meets the commit trigger's key locks ("outb") nor a
# host application's locks.
MIGRATION_LOCK = (0x6F75746D, 1)

config = context.config


def _url() -> str:
    configured = config.get_main_option("sqlalchemy.url")
    return database_url(configured or None)


def _include_object(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    # Reflected objects that the kit does not define belong to the host application.
    if type_ == "table":
        return name in metadata.tables
    if reflected and compare_to is None and type_ in ("index", "unique_constraint"):
        table = getattr(obj, "table", None)
        return table is not None and table.name in metadata.tables
    return True


def _configure(**kwargs: Any) -> None:
    context.configure(
        target_metadata=metadata,
        version_table=config.get_main_option("version_table") or VERSION_TABLE,
        include_object=_include_object,
        compare_type=True,
        **kwargs,
    )


def run_offline() -> None:
    _configure(url=_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def _migrate(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        # Held until this transaction ends; under READ COMMITTED the version
        # table is read after the lock is granted, so it shows the work of
        # whoever held it before.
        connection.execute(text("SELECT pg_advisory_xact_lock(:ns, :key)"),
                           {"ns": MIGRATION_LOCK[0], "key": MIGRATION_LOCK[1]})
        context.run_migrations()


def run_online() -> None:
    connectable = config.attributes.get("connection")
    if connectable is not None:
        _migrate(connectable)
        return
    engine = create_engine(_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        _migrate(connection)
    engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
