"""The local services' addresses, read in one place: the `OUTBOX_*` environment,
else what `devstack/devstack env` prints. Nothing here starts or stops a service.

No port is spelled anywhere else in the tests, the benchmark or the demo; the
devstack script is the one place that decides them (`OUTBOX_DEVSTACK_*_PORT`).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from outbox.config import safe_url

REPO: Path = Path(__file__).resolve().parent.parent
"""The repository root."""
DEVSTACK: Path = REPO / "devstack" / "devstack"
"""The script that runs the local services."""


class DevstackError(RuntimeError):
    """The devstack script is missing, failed, or did not finish in time."""


def run(*args: str, timeout: float) -> str:
    """Run ``devstack/devstack ARGS...`` and return its standard output.

    The script runs in its own session, so a Ctrl-C in the caller does not
    reach the servers it starts.
    """
    if not DEVSTACK.is_file():
        raise DevstackError(f"{DEVSTACK} is missing")
    try:
        proc = subprocess.run(
            [str(DEVSTACK), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            start_new_session=True,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise DevstackError(f"devstack {' '.join(args)} did not finish in {timeout:.0f}s") from exc
    if proc.returncode != 0:
        raise DevstackError(
            f"devstack {' '.join(args)} failed (exit {proc.returncode}):\n"
            f"{proc.stdout}{proc.stderr}".rstrip()
        )
    return proc.stdout


def env() -> dict[str, str]:
    """The variables ``devstack/devstack env`` exports (``OUTBOX_DATABASE_URL``,
    ``OUTBOX_KAFKA_BOOTSTRAP_SERVERS``, ``OUTBOX_DEVSTACK_KAFKA_SASL_*``, ``OUTBOX_DEVSTACK_KAFKA_SSL_*``)."""
    found: dict[str, str] = {}
    for line in run("env", timeout=30).splitlines():
        line = line.strip()
        if line.startswith("export ") and "=" in line:
            key, _, value = line[len("export ") :].partition("=")
            found[key.strip()] = value.strip().strip("'\"")
    return found


@dataclass(frozen=True)
class Addresses:
    database_url: str  # may hold a password: printed only through safe_url
    bootstrap_servers: str

    def __repr__(self) -> str:
        return f"Addresses({safe_url(self.database_url)}, {self.bootstrap_servers})"


def addresses() -> Addresses:
    """Where the kit's processes should connect: ``OUTBOX_DATABASE_URL`` and
    ``OUTBOX_KAFKA_BOOTSTRAP_SERVERS`` when set (`make demo` evals `devstack env`),
    else the devstack's own addresses. The script is asked only for what is missing."""
    database_url = os.environ.get("OUTBOX_DATABASE_URL", "").strip()
    bootstrap_servers = os.environ.get("OUTBOX_KAFKA_BOOTSTRAP_SERVERS", "").strip()
    if not (database_url and bootstrap_servers):
        served = env()
        database_url = database_url or served["OUTBOX_DATABASE_URL"]
        bootstrap_servers = bootstrap_servers or served["OUTBOX_KAFKA_BOOTSTRAP_SERVERS"]
    return Addresses(database_url, bootstrap_servers)


@dataclass(frozen=True)
class SaslListener:
    """The devstack broker's SASL_PLAINTEXT listener and its PLAIN credentials."""

    servers: str
    username: str
    password: str = field(repr=False)


def sasl_listener() -> SaslListener:
    served = env()
    return SaslListener(
        servers=served["OUTBOX_DEVSTACK_KAFKA_SASL_SERVERS"],
        username=served["OUTBOX_DEVSTACK_KAFKA_SASL_USERNAME"],
        password=served["OUTBOX_DEVSTACK_KAFKA_SASL_PASSWORD"],
    )


@dataclass(frozen=True)
class SslListener:
    """The devstack brokers' SASL_SSL listener: SCRAM-SHA-512 users whose ACLs
    allow the relay's user to write, and the consumer's user to read, the topics
    named ``topic_prefix*`` (the consumer also the groups named ``group_prefix*``)."""

    servers: str
    cluster_servers: str
    cafile: str
    untrusted_cafile: str  # a CA that signed nothing here: a client trusting it fails the handshake
    mechanism: str
    relay_username: str
    relay_password: str = field(repr=False)
    consumer_username: str = ""
    consumer_password: str = field(default="", repr=False)
    topic_prefix: str = ""
    group_prefix: str = ""


def ssl_listener() -> SslListener:
    served = env()

    def get(name: str) -> str:
        return served[f"OUTBOX_DEVSTACK_KAFKA_SSL_{name}"]

    return SslListener(
        servers=get("SERVERS"), cluster_servers=get("CLUSTER_SERVERS"), cafile=get("CAFILE"),
        untrusted_cafile=get("UNTRUSTED_CAFILE"), mechanism=get("MECHANISM"),
        relay_username=get("RELAY_USERNAME"), relay_password=get("RELAY_PASSWORD"),
        consumer_username=get("CONSUMER_USERNAME"), consumer_password=get("CONSUMER_PASSWORD"),
        topic_prefix=get("TOPIC_PREFIX"), group_prefix=get("GROUP_PREFIX"),
    )


@dataclass(frozen=True)
class PostgresTls:
    """The devstack PostgreSQL's TLS: its CA, a CA that signed nothing here, the
    role that is refused without TLS (a member of the kit's role), and the
    superuser's socket directory (for tests that create roles)."""

    cafile: str
    untrusted_cafile: str
    username: str
    password: str = field(repr=False)
    socket_dir: str = ""

    def url(self, database_url: str, *, cafile: str | None = None, sslmode: str = "verify-full") -> str:
        """`database_url` as this TLS role, with `sslmode` and `sslrootcert` in its query."""
        from sqlalchemy.engine import make_url

        parsed = make_url(database_url).set(username=self.username, password=self.password)
        query = {"sslmode": sslmode, **({"sslrootcert": cafile or self.cafile} if sslmode != "disable" else {})}
        return parsed.update_query_dict(query).render_as_string(hide_password=False)


def postgres_tls() -> PostgresTls:
    served = env()
    return PostgresTls(
        cafile=served["OUTBOX_DEVSTACK_PG_CAFILE"], untrusted_cafile=served["OUTBOX_DEVSTACK_PG_UNTRUSTED_CAFILE"],
        username=served["OUTBOX_DEVSTACK_PG_TLS_USERNAME"], password=served["OUTBOX_DEVSTACK_PG_TLS_PASSWORD"],
        socket_dir=served["OUTBOX_DEVSTACK_PG_SOCKET_DIR"],
    )
