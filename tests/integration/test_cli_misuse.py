"""The `outbox` command used the wrong way: every mistake ends in one clear line, the
right exit code, no traceback and no secret (guarantee 7).

Most cases call `outbox.cli.main` in this process (the same code the console
script runs, without a Python start-up per case); a few run the real command
line as a subprocess. Database failures are real: a wrong password, a port
nobody listens on, and an empty schema standing in for a database where the
kit's tables were never created.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from outbox import cli, migrate
from tests.kafka_helpers import REPO
from tests.schemas import empty_schema

SECRET = "S3cr3tXYZ"
# A handler of the right shape, so that a replay gets as far as the database.
HANDLER = "tests.integration.test_cli_misuse:ignore_event"


def ignore_event(session: object, event: object) -> None:
    """A dead-letter replay handler that does nothing."""
URL_WITH_SECRET = f"postgresql://user:{SECRET}@db.example:5432/payments"


def run_cli(
    capsys: pytest.CaptureFixture[str], *argv: str
) -> tuple[int, str, str]:
    """`outbox ARGV` in this process: (exit code, stdout, stderr)."""
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:  # argparse's way out
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def outbox_cli(*args: str, database_url: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "OUTBOX_DATABASE_URL"}
    if database_url is not None:
        env["OUTBOX_DATABASE_URL"] = database_url
    return subprocess.run(
        [sys.executable, "-m", "outbox", *args], env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=120,
    )


@pytest.fixture(autouse=True)
def no_database_url_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each case must get its URL from the command line it tests.
    monkeypatch.delenv("OUTBOX_DATABASE_URL", raising=False)


def assert_one_clean_line(err: str, out: str = "") -> None:
    assert "Traceback" not in err
    assert SECRET not in err + out
    assert len(err.strip().splitlines()) == 1, err


# -- shared options work wherever they are put -----------------------------------

EVERY_COMMAND = [
    ["db", "upgrade"],
    ["db", "downgrade"],
    ["db", "current"],
    ["db", "history"],
    ["db", "check"],
    ["relay"],
    ["stats"],
    ["parked", "list"],
    ["parked", "replay"],
    ["dead-letters", "list"],
    ["dead-letters", "replay", "--group", "g", "--handler", HANDLER],
    ["dead-letters", "discard", "--group", "g", "--reason", "r", "1"],
    ["inbox", "purge", "--older-than", "14d"],
]


def _placements(command: list[str], option: list[str]) -> list[list[str]]:
    """The option before the command, after each of its words (not between an option and
    its value), and at the end."""
    return [
        command[:i] + option + command[i:] for i in range(len(command) + 1)
        if i == 0 or not command[i - 1].startswith("--")
    ]


@pytest.mark.parametrize("command", EVERY_COMMAND, ids=" ".join)
def test_shared_options_work_before_after_and_between_subcommands(command: list[str]) -> None:
    url = "postgresql+psycopg://u@h/db"
    parser = cli.build_parser()
    for argv in _placements(command, ["--database-url", url, "--log-level", "debug"]):
        args = parser.parse_args(argv)
        assert args.database_url == url, argv
        assert args.log_level == "DEBUG", argv
        assert callable(args.command), argv


@pytest.mark.parametrize(
    "argv",
    [
        ["--database-url", "mysql://u@h/db", "relay"],
        ["relay", "--database-url", "mysql://u@h/db"],
    ],
    ids=["before-relay", "after-relay"],
)
def test_the_relay_gets_the_database_url_on_either_side(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    """`outbox --database-url URL relay` used to drop the URL silently. A URL the relay
    refuses proves it arrived (a dropped one would say OUTBOX_DATABASE_URL is not set)."""
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert "'mysql' is not supported" in err


def test_python_m_relay_takes_the_shared_options(capsys: pytest.CaptureFixture[str]) -> None:
    from relay.daemon import main

    assert main(["--database-url", "mysql://u@h/db", "--log-level", "warning"]) == 2
    assert "'mysql' is not supported" in capsys.readouterr().err


@pytest.mark.parametrize("position", ["before", "after"])
@pytest.mark.parametrize(
    "command", [["db", "current"], ["db", "check"], ["stats"], ["parked", "list"]], ids=" ".join
)
def test_the_real_command_line_takes_the_database_url_on_either_side(
    clean_db: Engine, database_url: str, command: list[str], position: str
) -> None:
    # clean_db: `stats` exits 1 on an event another test left without a position.
    option = ["--database-url", database_url]
    argv = option + command if position == "before" else command + option
    result = outbox_cli(*argv)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("argv", "hint"), [
    (["--batch-size", "3", "relay"], "`outbox relay --batch-size ...`"),
    (["db", "--revision", "x", "upgrade"], "`outbox db upgrade --revision ...`"),
    (["--limit=5", "parked", "list"], "`outbox parked list --limit ...`"),
    (["--bogus", "stats"], "see `outbox --help`"),
])
def test_an_option_before_its_command_names_where_it_belongs(
    capsys: pytest.CaptureFixture[str], argv: list[str], hint: str
) -> None:
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("outbox: error:") and hint in last, err
    assert "invalid choice" not in err


def test_db_upgrade_with_the_database_url_after_it_as_the_readme_writes(database_url: str) -> None:
    result = outbox_cli("db", "upgrade", "--database-url", database_url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"outbox: database at {migrate.head()}"


def test_a_postgres_scheme_url_works_on_the_command_line(database_url: str) -> None:
    url = make_url(database_url).set(drivername="postgres").render_as_string(hide_password=False)
    assert url.startswith("postgres://")
    result = outbox_cli("db", "current", "--database-url", url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{migrate.head()} (head)"


# -- a wrong value anywhere: exit 2, one line, no secret ---------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["parked", "list", "--limit", "-5"],
        ["parked", "list", "--limit", "0"],
        ["dead-letters", "list", "--limit", "abc"],
        ["--log-level", "LOUD", "stats"],
        ["stats", "--log-level", "LOUD"],
        ["inbox", "purge", "--older-than", "5x"],
        ["inbox", "purge", "--older-than", "0d"],
        ["inbox", "purge", "--older-than", "99999999999d"],
        ["parked", "replay", "not-a-uuid"],
        ["dead-letters", "replay", "--group", "g", "--handler", HANDLER, "0"],
        ["dead-letters", "discard", "--group", "g", "1"],
        ["dead-letters", "discard", "--group", "g", "--reason", "r"],
        ["relay", "--batch-size", "0"],
        ["relay", "--poll-interval", "-1"],
        ["relay", "--poll-interval", "nan"],
        ["db", "upgrade", "--bogus"],
        ["stats", "extra"],
        ["nonsense"],
        [],
    ],
    ids=lambda argv: " ".join(argv) or "nothing",
)
def test_a_wrong_argument_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert "Traceback" not in err
    if argv:
        assert err.strip().splitlines()[-1].startswith("outbox"), err
        assert "error:" in err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "argv",
    [
        ["stats", URL_WITH_SECRET],
        ["--db-url", URL_WITH_SECRET, "stats"],
        ["stats", f"--db-url={URL_WITH_SECRET}"],
        ["stats", f"password={SECRET}"],
        ["stats", "--password", SECRET],
        ["parked", "list", "--limit", URL_WITH_SECRET],
        ["parked", "replay", URL_WITH_SECRET],
        ["--log-level", URL_WITH_SECRET, "stats"],
        ["dead-letters", "replay", "--group", "g", "--handler", "x:y", URL_WITH_SECRET],
        ["--database-url", f"mysql://user:{SECRET}@h/db", "stats"],
        ["--database-url", f"postgresql+asyncpg://user:{SECRET}@h/db", "db", "current"],
    ],
)
def test_no_error_echoes_a_secret_from_the_command_line(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert SECRET not in out + err
    assert "Traceback" not in err


# -- the database refuses: exit 1, one line, and what to do -------------------------

# Every command that reads or writes the kit's tables.
NEEDS_THE_TABLES = [c for c in EVERY_COMMAND if c[0] not in ("db", "relay")] + [["db", "check"]]


@pytest.fixture(scope="module")
def empty_database(database_url: str) -> Iterator[str]:
    with empty_schema(database_url, "outbox_cli_empty") as url:
        yield url


def _wrong_password(database_url: str) -> str:
    return make_url(database_url).set(password=SECRET).render_as_string(hide_password=False)


def _unreachable(database_url: str) -> str:
    url = make_url(database_url).set(password=SECRET, host="127.0.0.1", port=1)
    return url.render_as_string(hide_password=False)


@pytest.mark.parametrize(
    "command", [*NEEDS_THE_TABLES, ["db", "current"], ["db", "upgrade"], ["db", "downgrade"]],
    ids=" ".join,
)
@pytest.mark.parametrize("failure", ["wrong-password", "unreachable-port"])
def test_a_database_that_cannot_be_reached_is_one_line_and_exit_1(
    capsys: pytest.CaptureFixture[str], database_url: str, command: list[str], failure: str
) -> None:
    url = _wrong_password(database_url) if failure == "wrong-password" else _unreachable(database_url)
    code, out, err = run_cli(capsys, *command, "--database-url", url)
    assert code == 1, err
    assert_one_clean_line(err, out)
    assert ("password authentication failed" if failure == "wrong-password"
            else "Connection refused") in err


@pytest.mark.parametrize("command", NEEDS_THE_TABLES, ids=" ".join)
def test_a_database_without_the_tables_says_run_db_upgrade(
    capsys: pytest.CaptureFixture[str], empty_database: str, command: list[str]
) -> None:
    code, out, err = run_cli(capsys, *command, "--database-url", empty_database)
    assert code == 1, err
    assert_one_clean_line(err, out)
    assert "run `outbox db upgrade`" in err


def test_a_database_error_from_the_real_command_line_is_one_line(empty_database: str) -> None:
    result = outbox_cli("stats", database_url=empty_database)
    assert result.returncode == 1
    assert_one_clean_line(result.stderr, result.stdout)
    assert "run `outbox db upgrade`" in result.stderr


# -- dead letters and the inbox ------------------------------------------------------


def _dead_letter(engine: Engine, key: bytes | None, value: bytes | None, group: str = "g") -> int:
    with engine.begin() as conn:
        return int(conn.execute(
            text(
                "INSERT INTO outbox_dead_letter (consumer_group, topic, partition, \"offset\","
                " key, value, headers, error, attempts)"
                " VALUES (:g, 'payments', 0, 7, :k, :v, '{}', 'ValueError: boom', 3) RETURNING id"
            ),
            {"g": group, "k": key, "v": value},
        ).scalar_one())


def test_dead_letters_list_prints_key_and_value_as_text_not_bytes_reprs(
    capsys: pytest.CaptureFixture[str], clean_db: Engine, database_url: str
) -> None:
    _dead_letter(clean_db, b"pay-3", b'{"amount":"1.00"}')
    _dead_letter(clean_db, b"\xff\x00", b"\x80")
    code, out, err = run_cli(capsys, "dead-letters", "list", "--database-url", database_url)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["key"], r["value"]) for r in rows] == [
        ("pay-3", '{"amount":"1.00"}'), ("hex:ff00", "hex:80")
    ]


def test_a_dead_letter_can_be_discarded_with_an_audit_line(
    clean_db: Engine, database_url: str
) -> None:
    kept = _dead_letter(clean_db, b"pay-4", b"{}")
    discarded = _dead_letter(clean_db, b"pay-5", b"not json")
    result = outbox_cli(
        "dead-letters", "discard", "--group", "g", "--reason", "garbage from a retired producer",
        str(discarded), database_url=database_url,
    )
    assert result.returncode == 0, result.stderr
    assert f"1 dead letter(s) discarded: {discarded}" in result.stdout
    audit = [line for line in result.stderr.splitlines() if "discarded" in line]
    assert len(audit) == 1 and "WARNING" in audit[0]
    assert "garbage from a retired producer" in audit[0] and "by=" in audit[0]
    with clean_db.connect() as conn:
        rows = {
            row.id: (row.replayed, row.error) for row in conn.execute(text(
                "SELECT id, replayed_at IS NOT NULL AS replayed, error FROM outbox_dead_letter"
            ))
        }
    replayed, error = rows[discarded]
    assert replayed and error.startswith("discarded by ")
    assert "garbage from a retired producer" in error and error.endswith("ValueError: boom")
    assert rows[kept] == (False, "ValueError: boom")

    listed = outbox_cli("dead-letters", "list", database_url=database_url)
    assert [json.loads(line)["id"] for line in listed.stdout.splitlines()] == [kept]

    again = outbox_cli(
        "dead-letters", "discard", "--group", "g", "--reason", "twice", str(discarded),
        database_url=database_url,
    )
    assert again.returncode == 1
    assert_one_clean_line(again.stderr)
    assert "no dead letter waiting" in again.stderr


def test_discarding_an_id_of_another_group_changes_nothing(
    clean_db: Engine, database_url: str
) -> None:
    mine = _dead_letter(clean_db, b"k", b"v", group="g")
    theirs = _dead_letter(clean_db, b"k", b"v", group="other")
    result = outbox_cli(
        "dead-letters", "discard", "--group", "g", "--reason", "r", str(mine), str(theirs),
        database_url=database_url,
    )
    assert result.returncode == 1
    assert str(theirs) in result.stderr
    with clean_db.connect() as conn:
        assert conn.execute(text(
            "SELECT count(*) FROM outbox_dead_letter WHERE replayed_at IS NOT NULL"
        )).scalar_one() == 0


def _inbox_row(engine: Engine, age: str) -> None:
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO outbox_inbox (consumer_group, event_id, topic, partition, \"offset\","
            " processed_at) VALUES ('g', gen_random_uuid(), 'payments', 0, 1, now() - CAST(:age AS interval))"
        ), {"age": age})


def _inbox_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM outbox_inbox")).scalar_one())


def test_a_purge_window_under_a_day_needs_yes_and_explains_the_risk(
    capsys: pytest.CaptureFixture[str], clean_db: Engine, database_url: str
) -> None:
    _inbox_row(clean_db, "2 hours")
    code, out, err = run_cli(
        capsys, "inbox", "purge", "--older-than", "30s", "--database-url", database_url
    )
    assert code == 2
    assert_one_clean_line(err, out)
    assert "applied twice" in err and "--yes" in err
    assert _inbox_count(clean_db) == 1

    code, out, err = run_cli(
        capsys, "inbox", "purge", "--older-than", "1h", "--yes", "--database-url", database_url
    )
    assert code == 0, err
    assert "warning" in err and "applied twice" in err
    assert "1 inbox row(s) purged" in out
    assert _inbox_count(clean_db) == 0
