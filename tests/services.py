"""Where the tests find their PostgreSQL and Kafka, and how fault tests break them.

Plain functions, no pytest fixtures: ``tests/conftest.py`` builds its fixtures on
:func:`database_url` and :func:`kafka_bootstrap_servers`.

Each service is looked up once per process, in this order:

1. an explicit address: ``OUTBOX_TEST_DATABASE_URL`` (a SQLAlchemy URL such as
   ``postgresql+psycopg://USER:PASSWORD@HOST:PORT/DATABASE``) and
   ``OUTBOX_TEST_KAFKA_BOOTSTRAP_SERVERS`` (``host:port[,host:port...]``);
2. testcontainers (``postgres:16`` and a KRaft Kafka), when a Docker engine
   answers a ping; the containers start once per process and stop at exit;
3. the repository's devstack (``devstack/devstack up``, idempotent): a local
   PostgreSQL and a Kafka broker, at the addresses ``devstack/devstack env``
   prints (read by :mod:`harness.devstack`).

``OUTBOX_TEST_BACKEND=devstack`` skips the Docker probe, ``=docker`` insists on
Docker (and fails without it); the default is ``auto``.

The fault helpers (:func:`restart_postgres`, :func:`restart_kafka`,
:func:`stop_kafka`, :func:`start_kafka`, and the 3-broker cluster helpers) drive
the devstack script, so they work only on devstack-managed services; an explicit
address that is the devstack's own address counts as devstack-managed.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import re
import signal
import threading
import time
import warnings
from typing import Any, Literal
from urllib.parse import urlsplit

from harness import devstack as _devstack
from harness.devstack import DEVSTACK, REPO

__all__ = [
    "DEVSTACK",
    "REPO",
    "Backend",
    "DevstackRequiredError",
    "Service",
    "ServicesError",
    "backend",
    "cluster_bootstrap_servers",
    "database_url",
    "devstack",
    "devstack_env",
    "docker_available",
    "is_devstack_managed",
    "kafka_bootstrap_servers",
    "kill_broker",
    "pause_broker",
    "rabbitmq_url",
    "rabbitmqctl",
    "require_devstack",
    "restart_kafka",
    "restart_postgres",
    "restart_rabbitmq",
    "start_broker",
    "start_kafka",
    "stop_cluster",
    "stop_kafka",
]

Service = Literal["postgres", "kafka"]
Backend = Literal["env", "docker", "devstack"]

POSTGRES_IMAGE = "postgres:16"
KAFKA_IMAGE = "confluentinc/cp-kafka:7.6.0"

_DEVSTACK_TIMEOUT_S = 900.0  # the first `up` may fetch the Kafka jars with Maven

_lock = threading.RLock()
_resolved: dict[Service, tuple[str, Backend]] = {}
_containers: list[Any] = []
_docker_ok: bool | None = None


class ServicesError(RuntimeError):
    """A test service could not be started, found or controlled."""


class DevstackRequiredError(ServicesError):
    """A fault helper was used on a service that the devstack does not manage."""


# ------------------------------------------------------------------ devstack --


def devstack(*args: str, timeout: float = _DEVSTACK_TIMEOUT_S) -> str:
    """Run ``devstack/devstack ARGS...`` and return its standard output.

    Raises :class:`ServicesError` with the script's output when it fails.
    """
    try:
        return _devstack.run(*args, timeout=timeout)
    except _devstack.DevstackError as exc:
        raise ServicesError(str(exc)) from exc


def devstack_env() -> dict[str, str]:
    """The addresses the devstack serves, from ``devstack/devstack env``.

    Keys: ``OUTBOX_DATABASE_URL`` and ``OUTBOX_KAFKA_BOOTSTRAP_SERVERS``.
    Starts nothing.
    """
    try:
        return _devstack.env()
    except _devstack.DevstackError as exc:
        raise ServicesError(str(exc)) from exc


# -------------------------------------------------------------------- docker --


def docker_available() -> bool:
    """True when a Docker engine answers a ping (any failure counts as "no Docker")."""
    global _docker_ok
    with _lock:
        if _docker_ok is None:
            _docker_ok = _ping_docker()
        return _docker_ok


def _ping_docker() -> bool:
    try:
        docker = importlib.import_module("docker")
        client = docker.from_env(timeout=5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def _choice() -> str:
    choice = os.environ.get("OUTBOX_TEST_BACKEND", "auto").strip().lower() or "auto"
    if choice not in ("auto", "docker", "devstack"):
        raise ServicesError(f"OUTBOX_TEST_BACKEND must be auto, docker or devstack, not {choice!r}")
    return choice


def _use_docker() -> bool:
    choice = _choice()
    if choice == "devstack":
        return False
    if choice == "docker" and not docker_available():
        raise ServicesError("OUTBOX_TEST_BACKEND=docker, but no Docker engine answers")
    return docker_available()


def _testcontainers_class(module: str, name: str) -> Any:
    # testcontainers >= 4.10 moved the modules to testcontainers.community.*;
    # the old paths still work but warn.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            mod = importlib.import_module(f"testcontainers.community.{module}")
        except ImportError:
            mod = importlib.import_module(f"testcontainers.{module}")
    return getattr(mod, name)


def _stop_containers() -> None:
    while _containers:
        container = _containers.pop()
        with contextlib.suppress(Exception):  # best effort at interpreter exit
            container.stop()


def _start_container(container: Any) -> Any:
    if not _containers:
        atexit.register(_stop_containers)
    container.start()
    _containers.append(container)
    return container


def _postgres_container_url() -> str:
    postgres_container = _testcontainers_class("postgres", "PostgresContainer")
    container = _start_container(postgres_container(POSTGRES_IMAGE, driver="psycopg"))
    return str(container.get_connection_url())


def _kafka_container_bootstrap() -> str:
    kafka_container = _testcontainers_class("kafka", "KafkaContainer")
    container = kafka_container(KAFKA_IMAGE).with_kraft().with_env("KAFKA_NUM_PARTITIONS", "4")
    return str(_start_container(container).get_bootstrap_server())


# ------------------------------------------------------------------ lookups --

_ENV_VAR: dict[Service, str] = {
    "postgres": "OUTBOX_TEST_DATABASE_URL",
    "kafka": "OUTBOX_TEST_KAFKA_BOOTSTRAP_SERVERS",
}
_DEVSTACK_VAR: dict[Service, str] = {
    "postgres": "OUTBOX_DATABASE_URL",
    "kafka": "OUTBOX_KAFKA_BOOTSTRAP_SERVERS",
}


def _resolve(service: Service) -> tuple[str, Backend]:
    with _lock:
        if service in _resolved:
            return _resolved[service]
        explicit = os.environ.get(_ENV_VAR[service], "").strip()
        if explicit:
            result: tuple[str, Backend] = (explicit, "env")
        elif _use_docker():
            start = _postgres_container_url if service == "postgres" else _kafka_container_bootstrap
            result = (start(), "docker")
        else:
            other: Service = "kafka" if service == "postgres" else "postgres"
            other_needs_devstack = other not in _resolved and not os.environ.get(_ENV_VAR[other])
            # `up` boots both at once; otherwise start only the one asked for.
            single = "pg-up" if service == "postgres" else "kafka-up"
            devstack("up" if other_needs_devstack else single)
            env = devstack_env()
            result = (env[_DEVSTACK_VAR[service]], "devstack")
            if other_needs_devstack:
                _resolved[other] = (env[_DEVSTACK_VAR[other]], "devstack")
        _resolved[service] = result
        return result


def database_url() -> str:
    """SQLAlchemy URL of the test PostgreSQL (``postgresql+psycopg://...``), started if needed."""
    return _resolve("postgres")[0]


def kafka_bootstrap_servers() -> str:
    """Bootstrap servers (``host:port[,...]``) of the test Kafka, started if needed."""
    return _resolve("kafka")[0]


def backend(service: Service) -> Backend:
    """Which source provides ``service``: ``"env"``, ``"docker"`` or ``"devstack"``."""
    return _resolve(service)[1]


def _normal_host(host: str) -> str:
    return "127.0.0.1" if host in ("localhost", "127.0.0.1", "::1", "[::1]") else host


def _pg_endpoint(url: str) -> tuple[str, int | None, str]:
    parts = urlsplit(url)
    return _normal_host(parts.hostname or ""), parts.port, parts.path.lstrip("/")


def _kafka_endpoints(servers: str) -> set[str]:
    out = set()
    for server in servers.split(","):
        host, _, port = server.strip().rpartition(":")
        out.add(f"{_normal_host(host)}:{port}")
    return out


def is_devstack_managed(service: Service) -> bool:
    """True when ``service`` is the devstack's, so the fault helpers can act on it."""
    address, source = _resolve(service)
    if source == "devstack":
        return True
    if source == "docker":
        return False
    ours = devstack_env()[_DEVSTACK_VAR[service]]
    if service == "postgres":
        # The same server counts, whichever database on it the tests use.
        return _pg_endpoint(address)[:2] == _pg_endpoint(ours)[:2]
    return _kafka_endpoints(address) == _kafka_endpoints(ours)


def require_devstack(*services: Service) -> None:
    """Raise :class:`DevstackRequiredError` unless every given service (default:
    both) is devstack-managed. Fault tests call this before breaking things."""
    for service in services or ("postgres", "kafka"):
        if not is_devstack_managed(service):
            address, source = _resolve(service)
            raise DevstackRequiredError(
                f"{service} at {address} comes from {source}, not from devstack/devstack; "
                "fault tests need the devstack (unset the OUTBOX_TEST_* address, "
                "or set OUTBOX_TEST_BACKEND=devstack)"
            )


# ----------------------------------------------------------- fault helpers --


def restart_postgres() -> None:
    """Crash PostgreSQL (``pg_ctl stop -m immediate``), start it again, wait until it answers."""
    require_devstack("postgres")
    devstack("pg-restart")


def restart_kafka() -> None:
    """SIGKILL the Kafka broker, start it again and wait until it answers metadata requests."""
    require_devstack("kafka")
    devstack("kafka-restart")


def stop_kafka() -> None:
    """Stop the Kafka broker gracefully (SIGTERM, SIGKILL after a timeout)."""
    require_devstack("kafka")
    devstack("kafka-down")


def start_kafka() -> None:
    """Start the Kafka broker (if it is not running) and wait until it answers."""
    require_devstack("kafka")
    devstack("kafka-up")


def rabbitmq_url() -> str:
    """The test RabbitMQ: ``OUTBOX_TEST_RABBITMQ_URL``, else the devstack's node
    (``devstack/devstack rabbitmq-up``, idempotent) at the URL ``devstack env`` prints."""
    with _lock:
        explicit = os.environ.get("OUTBOX_TEST_RABBITMQ_URL", "").strip()
        if explicit:
            return explicit
        devstack("rabbitmq-up")
        return devstack_env()["OUTBOX_RABBITMQ_URL"]


def restart_rabbitmq() -> None:
    """SIGKILL the devstack's RabbitMQ node, start it again, wait until it has booted."""
    if rabbitmq_url() != devstack_env()["OUTBOX_RABBITMQ_URL"]:
        raise DevstackRequiredError("RabbitMQ fault tests need the devstack's node")
    devstack("rabbitmq-restart")


def rabbitmqctl(*args: str) -> str:
    """The devstack node's rabbitmqctl (e.g. ``close_all_connections``)."""
    return _devstack.run("rabbitmqctl", *args, timeout=60)


def cluster_bootstrap_servers() -> str:
    """Start the devstack's 3-broker KRaft cluster (idempotent) and return its bootstrap
    servers. Topics there default to replication factor 3 and min.insync.replicas 2.
    Always the devstack (needs Java), whatever provides the single broker."""
    devstack("cluster-up")
    # `devstack env` does not print the cluster's addresses; these are its node_port().
    return "127.0.0.1:19192,127.0.0.1:19292,127.0.0.1:19392"


def stop_cluster() -> None:
    """Stop all brokers of the 3-broker cluster."""
    devstack("cluster-down")


def kill_broker(node: int) -> None:
    """SIGKILL broker ``node`` (1..3) of the 3-broker cluster."""
    devstack("broker-kill", _node(node))


def start_broker(node: int) -> None:
    """Start broker ``node`` (1..3) of the 3-broker cluster and wait until it serves metadata."""
    devstack("broker-start", _node(node))


def pause_broker(node: int, seconds: float) -> None:
    """SIGSTOP broker ``node`` for ``seconds``, then SIGCONT: a broker that stops
    answering without closing a connection, as a network partition looks to its
    clients (requests time out, the controller fences it after its session)."""
    status = devstack("cluster-status")
    found = re.search(rf"broker {_node(node)} running on \S+ \(pid (\d+)\)", status)
    if found is None:
        raise ServicesError(f"broker {node} is not running:\n{status}")
    pid = int(found.group(1))
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        os.kill(pid, signal.SIGCONT)


def _node(node: int) -> str:
    if node not in (1, 2, 3):
        raise ValueError(f"broker number must be 1, 2 or 3, not {node!r}")
    return str(node)
