"""No secret in any output: every command, the relay (both publishers) and a
consumer, given a database password and SASL credentials, made to fail the
ways a user meets them, with DEBUG logging on.

Failures: a database host that does not resolve, a wrong database password, a
database CA that did not sign the server's certificate; a broker that is down,
a wrong SASL password, a broker CA that did not sign its certificate. Whatever
reaches stdout, stderr, a log record or an exception's text (message, repr and
its causes) is searched for every secret in play: none appears, in any of the
forms a client might print it (as is, URL-encoded, hex of its bytes).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

import outbox
from harness import devstack
from harness.devstack import REPO
from tests.kafka_helpers import run_relay_until_exit, start_relay_process, stop_process

pytestmark = pytest.mark.integration

KAFKA = devstack.ssl_listener()
PG = devstack.postgres_tls()

# Secrets made for this run, so a hit can only be a leak: a wrong database
# password, a password for a host that does not exist, a wrong SASL password;
# and the real ones of the devstack's TLS role and SCRAM users.
WRONG_DB_PASSWORD = f"dbpw-{uuid.uuid4().hex[:12]}"
NOHOST_DB_PASSWORD = f"hostpw-{uuid.uuid4().hex[:12]}"
WRONG_SASL_PASSWORD = f"saslpw-{uuid.uuid4().hex[:12]}"
SECRETS = (WRONG_DB_PASSWORD, NOHOST_DB_PASSWORD, WRONG_SASL_PASSWORD, PG.password,
           KAFKA.relay_password, KAFKA.consumer_password)


def assert_no_secret(text: str, where: str) -> None:
    from urllib.parse import quote

    for secret in SECRETS:
        for form in {secret, quote(secret, safe=""), secret.encode().hex()}:
            assert form not in text, f"a secret ({secret[:4]}...) appears in {where}:\n{text[-2000:]}"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def urls(database_url: str) -> dict[str, str]:
    """A database URL per failure, each holding a password."""
    base = make_url(database_url)
    return {
        "wrong host": base.set(host="db-host-that-does-not-exist.invalid", password=NOHOST_DB_PASSWORD)
        .render_as_string(hide_password=False),
        "wrong password": base.set(password=WRONG_DB_PASSWORD).render_as_string(hide_password=False),
        "TLS error": PG.url(database_url, cafile=PG.untrusted_cafile),
    }


COMMANDS = [
    ["db", "upgrade"], ["db", "check"], ["db", "current"], ["stats"],
    ["db", "grants", "--relay", "some_relay"], ["parked", "list"], ["parked", "replay"],
    ["dead-letters", "list"], ["inbox", "purge", "--older-than", "14d"],
]


@pytest.mark.parametrize("failure", ["wrong host", "wrong password", "TLS error"])
def test_no_command_prints_a_database_secret(urls: dict[str, str], failure: str) -> None:
    for command in COMMANDS:
        # --database-url URL for every command; OUTBOX_DATABASE_URL for one (the same reader)
        for how in ("option", "env") if command == ["stats"] else ("option",):
            argv = [sys.executable, "-m", "outbox", "--log-level", "DEBUG", *command]
            env = dict(os.environ)
            if how == "option":
                argv += ["--database-url", urls[failure]]
            else:
                env["OUTBOX_DATABASE_URL"] = urls[failure]
            done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env, timeout=60,
                                  check=False)
            assert done.returncode != 0, (command, done.stdout)
            assert_no_secret(done.stdout + done.stderr, f"`outbox {' '.join(command)}` ({failure}, {how})")


def _relay_kafka_env(publisher: str, password: str, cafile: str = KAFKA.cafile) -> dict[str, str]:
    return {"OUTBOX_RELAY_PUBLISHER": publisher, "OUTBOX_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "OUTBOX_KAFKA_SASL_MECHANISM": KAFKA.mechanism,
            "OUTBOX_KAFKA_SASL_PLAIN_USERNAME": KAFKA.relay_username,
            "OUTBOX_KAFKA_SASL_PLAIN_PASSWORD": password, "OUTBOX_KAFKA_SSL_CAFILE": cafile}


@pytest.mark.parametrize("publisher", ["kafka-python", "confluent"])
def test_the_relay_prints_no_secret_whatever_fails(
    urls: dict[str, str], database_url: str, publisher: str, tmp_path: object,
) -> None:
    good_db = PG.url(database_url)
    debug = {"OUTBOX_RELAY_BACKOFF_MAX": "1"}
    runs = {
        "wrong db password": (urls["wrong password"], _relay_kafka_env(publisher, KAFKA.relay_password)),
        "db TLS error": (urls["TLS error"], _relay_kafka_env(publisher, KAFKA.relay_password)),
        "wrong SASL password": (good_db, _relay_kafka_env(publisher, WRONG_SASL_PASSWORD)),
        "broker TLS error": (good_db, _relay_kafka_env(publisher, KAFKA.relay_password, KAFKA.untrusted_cafile)),
    }
    for what, (url, env) in runs.items():
        exited = run_relay_until_exit(url, KAFKA.servers, extra_env={**env, **debug})
        assert exited.returncode == 2, (what, exited.output[-2000:])
        assert_no_secret(exited.output, f"the relay's output ({what}, {publisher})")
    # A database that does not resolve and a broker that is down are waited out:
    # a few seconds of retries at DEBUG, then SIGTERM.
    for what, url, servers in (("db host unknown", urls["wrong host"], KAFKA.servers),
                               ("broker down", good_db, f"127.0.0.1:{closed_port()}")):
        log = tmp_path / f"relay-{what.replace(' ', '-')}.log"  # type: ignore[operator]
        proc = start_relay_process(url, servers, log_path=log, extra_env={
            **_relay_kafka_env(publisher, KAFKA.relay_password), **debug})
        time.sleep(6)
        assert proc.poll() is None, f"the relay exited on '{what}', which it should wait out"
        stop_process(proc)
        assert_no_secret(log.read_text(), f"the relay's log ({what}, {publisher})")


class _Everything(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))
        if record.exc_info:
            self.lines.append(logging.Formatter().formatException(record.exc_info))


@pytest.fixture
def debug_log() -> Iterator[_Everything]:
    """Every record of every logger at DEBUG (kafka-python's wire lines included)."""
    handler = _Everything()
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _exception_text(exc: BaseException) -> str:
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        parts += [str(current), repr(current), repr(getattr(current, "args", ()))]
        current = current.__cause__ or current.__context__
    return "\n".join(parts)


def test_the_consumer_logs_and_raises_no_secret_whatever_fails(
    urls: dict[str, str], database_url: str, debug_log: _Everything, monkeypatch: pytest.MonkeyPatch,
) -> None:
    good_db = PG.url(database_url)
    cases = {
        "wrong db password": (urls["wrong password"], KAFKA.consumer_password, KAFKA.cafile, KAFKA.servers),
        "db TLS error": (urls["TLS error"], KAFKA.consumer_password, KAFKA.cafile, KAFKA.servers),
        "db host unknown": (urls["wrong host"], KAFKA.consumer_password, KAFKA.cafile, KAFKA.servers),
        "wrong SASL password": (good_db, WRONG_SASL_PASSWORD, KAFKA.cafile, KAFKA.servers),
        "broker TLS error": (good_db, KAFKA.consumer_password, KAFKA.untrusted_cafile, KAFKA.servers),
        "broker down": (good_db, KAFKA.consumer_password, KAFKA.cafile, f"127.0.0.1:{closed_port()}"),
    }
    for what, (url, password, cafile, servers) in cases.items():
        for name, value in {"OUTBOX_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                            "OUTBOX_KAFKA_SASL_MECHANISM": KAFKA.mechanism,
                            "OUTBOX_KAFKA_SASL_PLAIN_USERNAME": KAFKA.consumer_username,
                            "OUTBOX_KAFKA_SASL_PLAIN_PASSWORD": password, "OUTBOX_KAFKA_SSL_CAFILE": cafile,
                            "OUTBOX_KAFKA_BOOTSTRAP_TIMEOUT_MS": "3000"}.items():
            monkeypatch.setenv(name, value)
        engine = create_engine(url)
        consumer = outbox.Consumer(engine, group=f"{KAFKA.group_prefix}s-{uuid.uuid4().hex[:6]}",
                                   topics=[f"{KAFKA.topic_prefix}none"], bootstrap_servers=servers,
                                   handler=lambda session, event: None)
        raised: list[BaseException] = []

        def run(consumer: outbox.Consumer = consumer, raised: list[BaseException] = raised) -> None:
            try:
                consumer.run()
            except BaseException as exc:
                raised.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(8)  # refusals raise within seconds; outages are waited out: stop them
        consumer.stop()
        thread.join(30)
        assert not thread.is_alive(), what
        engine.dispose()
        assert debug_log.lines, f"nothing was logged for {what}: the capture is broken"
        text = "\n".join(debug_log.lines) + "\n".join(_exception_text(e) for e in raised)
        assert_no_secret(text, f"the consumer's logs and exceptions ({what})")
        debug_log.lines.clear()
