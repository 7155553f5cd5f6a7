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
from sqlalchemy import Engine, create_engine, inspect, text

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


def test_downgrade_then_upgrade_then_check(
    clean_db: Engine, at_head: Engine, database_url: str
) -> None:
    down = outbox_cli(database_url, "db", "downgrade")
    assert down.returncode == 0, down.stderr
    tables = set(inspect(at_head).get_table_names())
    assert not {"outbox_event", "outbox_inbox"} & tables
    assert "base" in outbox_cli(database_url, "db", "current").stdout
    again = outbox_cli(database_url, "db", "downgrade")  # at base already: nothing to do
    assert again.returncode == 0, again.stderr

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


def _event_fillfactor(engine: Engine) -> str | None:
    with engine.connect() as conn:
        options = conn.execute(text("SELECT reloptions FROM pg_class WHERE relname = 'outbox_event'")).scalar()
    return next((o.split("=")[1] for o in options or () if o.startswith("fillfactor=")), None)


def test_the_event_table_leaves_room_for_the_commit_triggers_update(
    at_head: Engine, database_url: str
) -> None:
    assert _event_fillfactor(at_head) == "50"
    at_head.dispose()
    assert outbox_cli(database_url, "db", "downgrade", "--revision", "0002_inbox").returncode == 0
    assert _event_fillfactor(at_head) is None
    assert outbox_cli(database_url, "db", "check").returncode == 1  # behind: upgrade again


def test_offline_sql_for_a_dba(database_url: str) -> None:
    sql = outbox_cli(database_url, "db", "upgrade", "--sql")
    assert sql.returncode == 0, sql.stderr
    assert "CREATE TABLE outbox_event" in sql.stdout
    assert "CREATE CONSTRAINT TRIGGER outbox_event_assign_position" in sql.stdout
    assert "outbox_alembic_version" in sql.stdout


def test_history_lists_every_revision(database_url: str) -> None:
    history = outbox_cli(database_url, "db", "history")
    assert history.returncode == 0
    assert all(r in history.stdout for r in ("0001_outbox", "0002_inbox", "0003_event_fillfactor"))


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


# -- a downgrade never drops rows without --force ------------------------------


def _fill_every_data_table(engine: Engine) -> None:
    from sqlalchemy.orm import Session

    import outbox

    with Session(engine) as session:
        for i in range(2):
            outbox.publish(session, topic="payments", key=f"p-{i}", type="t", data={})
        session.commit()
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO outbox_inbox (consumer_group, event_id, topic, partition, \"offset\")"
            " VALUES ('g', gen_random_uuid(), 'payments', 0, 1)"
        ))
        conn.execute(text(
            "INSERT INTO outbox_dead_letter (consumer_group, topic, partition, \"offset\", headers,"
            " error, attempts) VALUES ('g', 'payments', 0, 2, '{}', 'boom', 1)"
        ))


def _rows(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return migrate.row_counts(
            conn, ["outbox_event", "outbox_parked", "outbox_inbox", "outbox_dead_letter"]
        )


def test_downgrade_with_a_backlog_refuses_and_names_the_counts(
    clean_db: Engine, at_head: Engine, database_url: str
) -> None:
    _fill_every_data_table(clean_db)
    clean_db.dispose()
    down = outbox_cli(database_url, "db", "downgrade")
    assert down.returncode == 1
    assert down.stderr.count("\n") == 1, down.stderr
    for table_count in ("outbox_event 2", "outbox_inbox 1", "outbox_dead_letter 1", "--force"):
        assert table_count in down.stderr
    assert "outbox_parked" not in down.stderr  # empty tables are not named
    assert _rows(clean_db) == {
        "outbox_event": 2, "outbox_parked": 0, "outbox_inbox": 1, "outbox_dead_letter": 1
    }
    assert outbox_cli(database_url, "db", "current").stdout.strip() == f"{migrate.head()} (head)"


def test_a_downgrade_step_that_drops_the_inbox_refuses_while_it_holds_rows(
    clean_db: Engine, at_head: Engine, database_url: str
) -> None:
    _fill_every_data_table(clean_db)
    clean_db.dispose()
    down = outbox_cli(database_url, "db", "downgrade", "--revision", "0001_outbox")
    assert down.returncode == 1
    assert "outbox_inbox 1" in down.stderr and "outbox_event" not in down.stderr
    assert _rows(clean_db)["outbox_inbox"] == 1


def test_downgrade_force_drops_the_rows_it_names(
    clean_db: Engine, at_head: Engine, database_url: str
) -> None:
    _fill_every_data_table(clean_db)
    clean_db.dispose()
    down = outbox_cli(database_url, "db", "downgrade", "--force")
    assert down.returncode == 0, down.stderr
    assert not {"outbox_event", "outbox_inbox"} & set(inspect(at_head).get_table_names())


def test_a_downgrade_through_alembic_itself_refuses_to_drop_rows(
    clean_db: Engine, at_head: Engine, database_url: str
) -> None:
    """The guard lives in the migrations, so a host's own Alembic (or a script) hits it too."""
    from alembic import command

    _fill_every_data_table(clean_db)
    clean_db.dispose()
    with pytest.raises(migrate.SchemaError, match="outbox_inbox 1"):
        command.downgrade(migrate.alembic_config(database_url), "base")
    assert _rows(clean_db)["outbox_event"] == 2
    assert migrate.current(database_url) == migrate.head()


def test_offline_downgrade_ddl_carries_the_same_guard(database_url: str) -> None:
    sql = outbox_cli(database_url, "db", "downgrade", "--sql")
    assert sql.returncode == 0, sql.stderr
    guard = sql.stdout.index("refusing to drop outbox_inbox, outbox_dead_letter")
    assert guard < sql.stdout.index("DROP TABLE outbox_inbox")


# -- check verifies the commit trigger; stats shows what it would have hidden -----


def _restore_trigger(engine: Engine) -> None:
    module = migrate._scripts().get_revision("0001_outbox").module
    with engine.begin() as conn:
        conn.execute(text("DROP TRIGGER IF EXISTS outbox_event_assign_position ON outbox_event"))
        conn.exec_driver_sql(
            module.ASSIGN_POSITIONS.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION")
        )
        conn.execute(text(
            "CREATE CONSTRAINT TRIGGER outbox_event_assign_position"
            " AFTER INSERT ON outbox_event DEFERRABLE INITIALLY DEFERRED"
            " FOR EACH ROW EXECUTE FUNCTION outbox_assign_positions()"
        ))


BROKEN_TRIGGERS = [
    pytest.param("DROP TRIGGER outbox_event_assign_position ON outbox_event", "missing",
                 id="missing"),
    pytest.param("ALTER TABLE outbox_event DISABLE TRIGGER outbox_event_assign_position",
                 "disabled", id="disabled"),
    pytest.param(
        "CREATE OR REPLACE FUNCTION outbox_assign_positions() RETURNS trigger"
        " LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$", "differs", id="function-replaced",
    ),
    pytest.param(
        "DROP TRIGGER outbox_event_assign_position ON outbox_event;"
        " CREATE TRIGGER outbox_event_assign_position AFTER INSERT ON outbox_event"
        " FOR EACH ROW EXECUTE FUNCTION outbox_assign_positions()", "DEFERRABLE",
        id="not-deferred",
    ),
]


@pytest.mark.parametrize(("breakage", "named"), BROKEN_TRIGGERS)
def test_check_fails_when_the_commit_trigger_is_broken(
    clean_db: Engine, database_url: str, breakage: str, named: str
) -> None:
    with clean_db.begin() as conn:
        conn.exec_driver_sql(breakage)
    try:
        check = outbox_cli(database_url, "db", "check")
        assert check.returncode == 1
        assert named in check.stderr
        assert "never published" in check.stderr
        assert check.stderr.count("\n") == 1, check.stderr
    finally:
        _restore_trigger(clean_db)
    assert outbox_cli(database_url, "db", "check").returncode == 0


def test_stats_counts_events_committed_without_a_position(
    clean_db: Engine, database_url: str
) -> None:
    from sqlalchemy.orm import Session

    import outbox

    with clean_db.begin() as conn:
        conn.execute(text("DROP TRIGGER outbox_event_assign_position ON outbox_event"))
    try:
        with Session(clean_db) as session:
            outbox.publish(session, topic="payments", key="k", type="t", data={})
            session.commit()
        result = outbox_cli(database_url, "stats")
    finally:
        _restore_trigger(clean_db)
    assert result.returncode == 1
    lines = dict(line.rsplit(None, 1) for line in result.stdout.strip().splitlines())
    assert lines["committed (n)"] == "1"
    assert lines["backlog (Q = n - m)"] == "1"
    assert lines["not yet numbered"] == "1"
    assert "`outbox db check`" in result.stderr


def test_check_prints_only_its_own_line(database_url: str) -> None:
    check = outbox_cli(database_url, "db", "check")
    assert check.returncode == 0, check.stderr
    assert check.stdout == "outbox: schema matches the kit's models\n"
    assert "No new upgrade operations" not in check.stdout + check.stderr


def test_offline_sql_needs_no_database_url() -> None:
    env = {k: v for k, v in os.environ.items() if k != "OUTBOX_DATABASE_URL"}
    result = subprocess.run(
        [sys.executable, "-m", "outbox", "db", "upgrade", "--sql"],
        env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "CREATE TABLE outbox_event" in result.stdout


# -- concurrent upgrades ---------------------------------------------------------


@pytest.fixture
def fresh_database(database_url: str) -> Iterator[str]:
    from tests.schemas import empty_schema

    with empty_schema(database_url, "outbox_fresh") as url:
        yield url


def test_six_concurrent_upgrades_of_a_new_database_all_succeed(fresh_database: str) -> None:
    env = {**os.environ, "OUTBOX_DATABASE_URL": fresh_database, "PYTHONPATH": str(REPO)}
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "outbox", "db", "upgrade"], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for _ in range(6)
    ]
    results = [(p.wait(timeout=120), p.stderr.read() if p.stderr else "") for p in processes]
    for p in processes:
        for stream in (p.stdout, p.stderr):
            if stream:
                stream.close()
    assert [code for code, _ in results] == [0] * 6, results
    check = outbox_cli(fresh_database, "db", "check")
    assert check.returncode == 0, check.stderr


def test_a_downgrade_of_a_database_without_the_kit_is_one_line_and_creates_nothing(
    fresh_database: str,
) -> None:
    """Before, Alembic created its version table in the wrong database (or failed
    on privileges with an error that did not say the database was wrong)."""
    down = outbox_cli(fresh_database, "db", "downgrade")
    assert down.returncode == 1
    assert down.stderr.count("\n") == 1, down.stderr
    assert "has none of the kit's tables" in down.stderr and "--database-url" in down.stderr
    assert outbox_cli(fresh_database, "db", "current").stdout.strip().startswith("base")
    engine = create_engine(fresh_database)
    try:
        assert inspect(engine).get_table_names() == []
    finally:
        engine.dispose()
