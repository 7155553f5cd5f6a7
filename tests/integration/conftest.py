"""Fixtures shared by the tests.

Integration tests run against the real PostgreSQL and the real Kafka broker:
`tests/services.py` finds them (explicit OUTBOX_TEST_* variables, else
testcontainers where a Docker engine answers, else the project's devstack).
Nothing here stands in for either service. If a service cannot be had, the
fixtures fail loudly; they never skip.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator

import pytest
from kafka.admin import KafkaAdminClient, NewTopic
from sqlalchemy import Engine, create_engine, text

from outbox import migrate
from tests import services
from tests.consumer_proc import EFFECT_TABLE_DDL
from tests.rabbitmq_helpers import rabbitmq_url, topologies  # noqa: F401  # the RabbitMQ tests' fixtures


@pytest.fixture(scope="session")
def database_url() -> str:
    url = services.database_url()
    migrate.upgrade(url)
    return url


@pytest.fixture(scope="session")
def bootstrap_servers() -> str:
    return services.kafka_bootstrap_servers()


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[Engine]:
    engine = create_engine(database_url, pool_size=10, max_overflow=20, pool_pre_ping=True)
    yield engine
    engine.dispose()


@pytest.fixture
def group() -> str:
    """A consumer group of its own, so no test sees another's offsets."""
    return f"g-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def effects(engine: Engine) -> Engine:
    """The effect table the test consumers write (tests/consumer_proc.py)."""
    with engine.begin() as conn:
        conn.execute(text(EFFECT_TABLE_DDL))
    return engine


@pytest.fixture
def clean_db(engine: Engine) -> Engine:
    """The migrated database with every table of the kit emptied."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "TRUNCATE outbox_event, outbox_parked, outbox_inbox, outbox_dead_letter;"
                " UPDATE outbox_counter SET value = 0"
            )
        )
    return engine


@pytest.fixture
def admin(bootstrap_servers: str) -> Iterator[KafkaAdminClient]:
    # Per test, not per session: fault tests restart the broker under it.
    client = KafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=30000)
    yield client
    client.close()


@pytest.fixture
def make_topic(admin: KafkaAdminClient) -> Iterator[object]:
    """Creates fresh topics (4 partitions) with unique names, so tests never see each other.

    They are deleted after the test: every partition left behind makes each
    later broker restart (the fault tests do several) recover one more log.
    """
    created: list[str] = []

    def make(prefix: str = "t", partitions: int = 4) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        admin.create_topics([NewTopic(name, partitions, 1)])
        created.append(name)
        _wait_for_leaders(admin, name, partitions)
        return name

    yield make
    if created:
        with contextlib.suppress(Exception):  # best effort: a broker restarted by the test may lag
            admin.delete_topics(created)


@pytest.fixture
def topic(make_topic: object) -> str:
    assert callable(make_topic)
    name = make_topic()
    assert isinstance(name, str)
    return name


def _wait_for_leaders(admin: KafkaAdminClient, topic: str, partitions: int) -> None:
    """Until every partition of a new topic has a leader: a client that subscribes
    sooner can see no partitions at all and wait for nothing."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        described = admin.describe_topics([topic])
        parts = described[0].get("partitions") or [] if described else []
        if len(parts) == partitions and all(p.get("leader_id", -1) >= 0 for p in parts):
            return
        time.sleep(0.1)
    raise AssertionError(f"topic {topic} has no leader for every partition after 30 s")
