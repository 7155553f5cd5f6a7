"""The migration CLI against a real database: upgrade, downgrade, check, offline SQL.

These tests take the kit's tables down and up again in the shared test
database, and always leave it at head.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, inspect, text

from outbox import migrate
from tests.kafka_helpers import REPO

pytestmark = pytest.mark.integration


def outbox_cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OUTBOX_DATABASE_URL": database_url, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "outbox", *args], env=env, capture_output=True, text=True,
        timeout=120,
    )


@pytest.fixture
def at_head(engine: Engine, database_url: str) -> Iterator[Engine]:
    engine.dispose()  # no pooled connection may hold a lock on a table we drop
    yield engine
    engine.dispose()
    migrate.upgrade(database_url)


def test_downgrade_then_upgrade_then_check(at_head: Engine, database_url: str) -> None:
    down = outbox_cli(database_url, "db", "downgrade")
    assert down.returncode == 0, down.stderr
    tables = set(inspect(at_head).get_table_names())
    assert not {"outbox_event", "outbox_inbox"} & tables
    assert "base" in outbox_cli(database_url, "db", "current").stdout

    up = outbox_cli(database_url, "db", "upgrade")
    assert up.returncode == 0, up.stderr
    current = outbox_cli(database_url, "db", "current")
    assert current.stdout.strip() == f"{migrate.head()} (head)"
    check = outbox_cli(database_url, "db", "check")
    assert check.returncode == 0, check.stderr


def test_check_fails_when_the_schema_drifts(at_head: Engine, database_url: str) -> None:
    at_head.dispose()
    with at_head.begin() as conn:
        conn.execute(text("ALTER TABLE outbox_parked ADD COLUMN surprise int"))
    try:
        check = outbox_cli(database_url, "db", "check")
        assert check.returncode == 1
        assert "differs" in check.stderr
        assert "Traceback" not in check.stderr
    finally:
        with at_head.begin() as conn:
            conn.execute(text("ALTER TABLE outbox_parked DROP COLUMN surprise"))


def test_check_fails_when_behind(at_head: Engine, database_url: str) -> None:
    assert outbox_cli(database_url, "db", "downgrade", "--revision", "0001_outbox").returncode == 0
    check = outbox_cli(database_url, "db", "check")
    assert check.returncode == 1
    assert "run `outbox db upgrade`" in check.stderr


def test_offline_sql_for_a_dba(database_url: str) -> None:
    sql = outbox_cli(database_url, "db", "upgrade", "--sql")
    assert sql.returncode == 0, sql.stderr
    assert "CREATE TABLE outbox_event" in sql.stdout
    assert "CREATE CONSTRAINT TRIGGER outbox_event_assign_position" in sql.stdout
    assert "outbox_alembic_version" in sql.stdout


def test_history_lists_every_revision(database_url: str) -> None:
    history = outbox_cli(database_url, "db", "history")
    assert history.returncode == 0
    assert "0001_outbox" in history.stdout and "0002_inbox" in history.stdout


def test_a_wrong_password_is_one_clear_line_without_the_password(database_url: str) -> None:
    from sqlalchemy.engine import make_url

    wrong = make_url(database_url).set(password="not-the-password-xyz")
    result = outbox_cli(wrong.render_as_string(hide_password=False), "db", "upgrade")
    assert result.returncode == 1
    assert "not-the-password-xyz" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_missing_database_url_says_what_to_do() -> None:
    env = {k: v for k, v in os.environ.items() if k != "OUTBOX_DATABASE_URL"}
    result = subprocess.run(
        [sys.executable, "-m", "outbox", "db", "current"], env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "OUTBOX_DATABASE_URL" in result.stderr


def test_stats_prints_the_backlog_formula(clean_db: object, database_url: str) -> None:
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session

    import outbox

    assert isinstance(clean_db, Engine)
    with Session(clean_db) as session:
        for i in range(3):
            outbox.publish(session, topic="payments", key=f"k{i}", type="t", data={})
        session.commit()
    result = outbox_cli(database_url, "stats")
    assert result.returncode == 0, result.stderr
    lines = dict(line.rsplit(None, 1) for line in result.stdout.strip().splitlines())
    assert lines["committed (n)"] == "3"
    assert lines["published (m)"] == "0"
    assert lines["backlog (Q = n - m)"] == "3"
    assert lines["parked"] == "0"
    assert lines["oldest unpublished"].endswith("s")
