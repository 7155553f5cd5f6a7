"""Least privilege: the writer, the relay and a consumer each as its own LOGIN role,
with exactly what `outbox db grants` gives it.

The roles are made by the test as the PostgreSQL superuser (through the
devstack server's socket, `runuser -u postgres -- psql` when run as root),
given their grants by `outbox db grants` run as the tables' owner, and then
each does its job (events written, published, consumed) and is refused what
it must not do: the writer cannot read, change or delete an event nor read
the inbox, the relay cannot touch the inbox or the dead letters, a consumer
cannot touch the outbox.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.orm import Session

import outbox
from harness import devstack
from harness.devstack import REPO
from outbox.schema import outbox_event
from relay import RelayConfig
from tests.kafka_helpers import relay_thread, wait_until

pytestmark = pytest.mark.integration

SOCKET_DIR = devstack.postgres_tls().socket_dir


def as_superuser(database_url: str, sql: str) -> None:
    """`psql -c SQL` as the server's superuser, on the database of `database_url`."""
    url = make_url(database_url)
    argv = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", SOCKET_DIR, "-p", str(url.port or 5432),
            "-d", str(url.database), "-c", sql]
    if os.geteuid() == 0:
        argv = ["runuser", "-u", "postgres", "--", *argv]
    done = subprocess.run(argv, capture_output=True, text=True, cwd="/", timeout=60, check=False)
    assert done.returncode == 0, done.stderr


def outbox_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "outbox", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=60, check=False)


@dataclass(frozen=True)
class Role:
    name: str
    url: str


@pytest.fixture(scope="module")
def roles(database_url: str) -> Iterator[dict[str, Role]]:
    suffix = uuid.uuid4().hex[:8]
    made: dict[str, Role] = {}
    for side in ("writer", "relay", "consumer"):
        name, password = f"outbox_{side}_{suffix}", f"pw-{side}-{uuid.uuid4().hex[:12]}"
        as_superuser(database_url, f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
        url = make_url(database_url).set(username=name, password=password).render_as_string(hide_password=False)
        made[side] = Role(name, url)
    granted = outbox_cli("db", "grants", "--database-url", database_url, "--writer", made["writer"].name,
                         "--relay", made["relay"].name, "--consumer", made["consumer"].name)
    assert granted.returncode == 0, granted.stderr
    yield made
    for role in made.values():
        as_superuser(database_url, f"DROP OWNED BY {role.name}; DROP ROLE {role.name}")


@pytest.fixture
def engines(roles: dict[str, Role]) -> Iterator[dict[str, Engine]]:
    made = {side: create_engine(role.url) for side, role in roles.items()}
    yield made
    for engine in made.values():
        engine.dispose()


def refused(engine: Engine, sql: str) -> bool:
    """True when PostgreSQL answers `sql` with "permission denied" for this role."""
    with engine.connect() as conn:
        try:
            conn.execute(text(sql))
        except ProgrammingError as exc:
            return "permission denied" in str(exc.orig)
        finally:
            conn.rollback()
    return False


def test_each_role_does_its_job_and_is_refused_the_rest(
    clean_db: Engine, engines: dict[str, Engine], roles: dict[str, Role], bootstrap_servers: str,
    topic: str, group: str,
) -> None:
    writer, relay, consumer = engines["writer"], engines["relay"], engines["consumer"]
    with Session(writer) as session:
        ids = {outbox.publish(session, topic=topic, key=f"k-{i % 3}", type="t", data={"n": i}).id
               for i in range(9)}
        session.commit()
    with clean_db.connect() as conn:  # numbered by the commit trigger, which runs as the owner
        numbered = conn.execute(select(func.count()).select_from(outbox_event)
                                .where(outbox_event.c.position.isnot(None))).scalar_one()
    assert numbered == 9

    assert refused(writer, "DELETE FROM outbox_event")
    assert refused(writer, "SELECT payload FROM outbox_event")
    assert refused(writer, "UPDATE outbox_event SET topic = 'elsewhere'")
    assert refused(writer, "SELECT * FROM outbox_inbox")
    assert refused(writer, "UPDATE outbox_counter SET value = 0")

    config = RelayConfig(database_url=roles["relay"].url, bootstrap_servers=bootstrap_servers, poll_interval=0.2)
    with relay_thread(config):
        wait_until(lambda: _backlog(clean_db) == 0, timeout=60, what="the relay role to drain the outbox")
    assert refused(relay, "SELECT * FROM outbox_inbox")
    assert refused(relay, "DELETE FROM outbox_dead_letter")
    assert refused(relay, "INSERT INTO outbox_event (id, topic, key, type, payload, content_type, created_at)"
                          " VALUES (gen_random_uuid(), 't', 'k', 't', '', 'x', now())")
    assert refused(relay, "UPDATE outbox_event SET payload = ''")

    seen: set[uuid.UUID] = set()
    ledger = outbox.Consumer(consumer, group=group, topics=[topic], bootstrap_servers=bootstrap_servers,
                             handler=lambda session, event: seen.add(event.id))
    try:
        wait_until(lambda: ledger.run_once(500) >= 0 and seen >= ids, timeout=60, what="the consumer role")
    finally:
        ledger.close()
    assert seen == ids
    assert refused(consumer, "SELECT * FROM outbox_event")
    assert refused(consumer, "DELETE FROM outbox_parked")
    assert refused(consumer, "UPDATE outbox_counter SET value = 0")
    assert refused(consumer, "UPDATE outbox_relay_lease SET owner = 'me'")


def _backlog(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(outbox_event)).scalar_one())


def test_grants_sql_needs_no_database_and_names_every_role() -> None:
    printed = outbox_cli("db", "grants", "--writer", "app", "--relay", "relay", "--consumer", "Ledger Team",
                         "--sql")
    assert printed.returncode == 0, printed.stderr
    assert 'TO "Ledger Team";' in printed.stdout and "SECURITY DEFINER" in printed.stdout
    assert "GRANT INSERT ON public.outbox_event TO app;" in printed.stdout
    assert outbox_cli("db", "grants", "--sql").returncode == 2


def test_grants_on_the_wrong_database_or_for_a_missing_role_are_one_line(
    database_url: str, roles: dict[str, Role]
) -> None:
    elsewhere = make_url(database_url).set(database="postgres").render_as_string(hide_password=False)
    wrong_db = outbox_cli("db", "grants", "--database-url", elsewhere, "--writer", roles["writer"].name)
    assert wrong_db.returncode == 1 and len(wrong_db.stderr.splitlines()) == 1, wrong_db.stderr
    assert "run `outbox db upgrade`" in wrong_db.stderr

    no_role = outbox_cli("db", "grants", "--database-url", database_url, "--relay", "nobody_" + uuid.uuid4().hex[:6])
    assert no_role.returncode == 2 and len(no_role.stderr.splitlines()) == 1, no_role.stderr
    assert "do not exist" in no_role.stderr

    not_owner = outbox_cli("db", "grants", "--database-url", roles["writer"].url, "--writer", roles["writer"].name)
    assert not_owner.returncode == 1 and len(not_owner.stderr.splitlines()) == 1, not_owner.stderr
    assert "as their owner" in not_owner.stderr
    password = make_url(roles["writer"].url).password
    assert password and password not in not_owner.stderr
