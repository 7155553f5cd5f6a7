"""The writer, the relay and a consumer over TLS to PostgreSQL, with `sslmode=verify-full`.

The devstack server always speaks TLS (a certificate from the devstack's CA
for 127.0.0.1 and localhost) and refuses its TLS role (`devstack env`:
OUTBOX_DEVSTACK_PG_TLS_*) any connection without it, so every connection made
here is proved to be TLS, and its server certificate checked against the CA
and the host name. The libpq settings ride in the URL's query
(`?sslmode=verify-full&sslrootcert=/path/ca.pem`), for SQLAlchemy and for the
relay's own psycopg connections alike.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.orm import Session

import outbox
from harness import devstack
from harness.devstack import REPO
from outbox.errors import ConfigError
from outbox.schema import outbox_event
from tests.kafka_helpers import run_relay_until_exit, start_relay_process, stop_process, wait_until

pytestmark = pytest.mark.integration

TLS = devstack.postgres_tls()


@pytest.fixture
def tls_url(database_url: str) -> str:
    return TLS.url(database_url)


@pytest.fixture
def tls_engine(tls_url: str) -> Iterator[Engine]:
    engine = create_engine(tls_url, pool_pre_ping=True)
    yield engine
    engine.dispose()


def _backlog(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(outbox_event)).scalar_one())


def test_writer_relay_and_consumer_work_over_verify_full(
    clean_db: Engine, tls_engine: Engine, tls_url: str, bootstrap_servers: str, topic: str, group: str,
) -> None:
    with Session(tls_engine) as session:
        encrypted = session.execute(text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")).scalar()
        ids = {outbox.publish(session, topic=topic, key=f"k-{i % 2}", type="t", data={"n": i}).id
               for i in range(10)}
        session.commit()
    assert encrypted is True
    relay = start_relay_process(tls_url, bootstrap_servers)
    try:
        wait_until(lambda: _backlog(clean_db) == 0, timeout=60, what="the relay (over TLS) to drain")
    finally:
        assert stop_process(relay) == 0
    seen: set[uuid.UUID] = set()
    consumer = outbox.Consumer(tls_engine, group=group, topics=[topic], bootstrap_servers=bootstrap_servers,
                               handler=lambda session, event: seen.add(event.id))
    try:
        wait_until(lambda: consumer.run_once(500) >= 0 and seen >= ids, timeout=60, what="all consumed")
    finally:
        consumer.close()
    assert seen == ids
    with clean_db.connect() as conn:
        applied = conn.execute(text("SELECT count(*) FROM outbox_inbox WHERE consumer_group = :g"),
                               {"g": group}).scalar_one()
    assert applied == 10


def test_a_wrong_ca_is_one_line_from_the_relay_the_cli_and_the_consumer(
    database_url: str, bootstrap_servers: str, topic: str, group: str,
) -> None:
    wrong_ca = TLS.url(database_url, cafile=TLS.untrusted_cafile)
    exited = run_relay_until_exit(wrong_ca, bootstrap_servers)
    lines = [line for line in exited.output.splitlines() if line.startswith("outbox relay: ")]
    assert exited.returncode == 2 and len(lines) == 1, exited.output[-3000:]
    assert "OUTBOX_DATABASE_URL" in lines[0] and "certificate verify failed" in lines[0], lines[0]
    assert TLS.password not in exited.output

    cli = subprocess.run([sys.executable, "-m", "outbox", "stats", "--database-url", wrong_ca],
                         capture_output=True, text=True, cwd=REPO, timeout=60, check=False)
    assert cli.returncode == 1 and cli.stdout == "", cli
    assert len(cli.stderr.splitlines()) == 1 and "certificate verify failed" in cli.stderr, cli.stderr
    assert "check sslmode and sslrootcert" in cli.stderr, cli.stderr
    assert TLS.password not in cli.stderr

    engine = create_engine(wrong_ca)
    try:
        consumer = outbox.Consumer(engine, group=group, topics=[topic], bootstrap_servers=bootstrap_servers,
                                   handler=lambda session, event: None)
        with pytest.raises(ConfigError) as refused:
            consumer.run_once(100)
        consumer.close()
    finally:
        engine.dispose()
    assert "certificate verify failed" in str(refused.value) and "\n" not in str(refused.value)
    assert TLS.password not in str(refused.value)


def test_the_tls_role_is_refused_without_tls_in_one_line(database_url: str, bootstrap_servers: str) -> None:
    plain = TLS.url(database_url, sslmode="disable")
    exited = run_relay_until_exit(plain, bootstrap_servers)
    lines = [line for line in exited.output.splitlines() if line.startswith("outbox relay: ")]
    assert exited.returncode == 2 and len(lines) == 1, exited.output[-3000:]
    assert "OUTBOX_DATABASE_URL" in lines[0] and "no encryption" in lines[0], lines[0]
    assert TLS.password not in exited.output
