"""A schema of its own inside the test database, standing in for a new, empty database.

The test role may not CREATE DATABASE; a schema first on the `search_path`
(set for every connection through the URL) is, for the kit, exactly a
database where its tables were never created.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url


@contextlib.contextmanager
def empty_schema(database_url: str, name: str) -> Iterator[str]:
    """Yields a URL whose connections see only the (new, empty) schema `name`."""
    engine = create_engine(database_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
        conn.execute(text(f'CREATE SCHEMA "{name}"'))
    url = make_url(database_url).update_query_dict({"options": f"-csearch_path={name}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with engine.connect() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
        engine.dispose()
