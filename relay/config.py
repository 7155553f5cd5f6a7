"""`RelayConfig`: every setting of the relay, validated when it is made."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from outbox.config import (
    BOOTSTRAP_SERVERS_ENV,
    DATABASE_URL_ENV,
    bootstrap_servers,
    database_url,
    kafka_client_config,
    safe_kafka_config,
    safe_url,
    settings_from_env,
)
from outbox.errors import ConfigError
from outbox.rabbitmq_wire import RABBITMQ_URL_ENV, rabbitmq_url
from relay.publishers import PUBLISHERS

RABBITMQ = "rabbitmq"  # the publisher that needs OUTBOX_RABBITMQ_URL instead of Kafka's servers


def default_relay_id() -> str:
    """host:pid:random, so a restarted process never inherits its predecessor's leases."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True, kw_only=True)
class RelayConfig:
    """Settings of one relay process.

    >>> RelayConfig(database_url="postgresql+psycopg://app@db/payments",
    ...             bootstrap_servers="kafka-1:9092", batch_size=1000)  # doctest: +SKIP
    """

    # Read by their own functions (checked, normalised, the password registered
    # as a secret), not by the generic reader: see from_env.
    database_url: str = field(metadata={"env": DATABASE_URL_ENV})  # OUTBOX_DATABASE_URL
    bootstrap_servers: str = field(  # OUTBOX_KAFKA_BOOTSTRAP_SERVERS; not needed by the rabbitmq publisher
        default="", metadata={"env": BOOTSTRAP_SERVERS_ENV}
    )
    source: str = "outbox-relay"  # OUTBOX_RELAY_SOURCE: the CloudEvents `source` attribute
    batch_size: int = 500  # OUTBOX_RELAY_BATCH_SIZE: events per fetch/publish/delete round, 1..10000
    max_in_flight: int = 4  # OUTBOX_RELAY_MAX_IN_FLIGHT: batches sent, not yet settled (relay/window.py), 1..64
    poll_interval: float = 1.0  # OUTBOX_RELAY_POLL_INTERVAL: seconds between polls when no NOTIFY arrives
    listen: bool = True  # OUTBOX_RELAY_LISTEN: wake on NOTIFY (polling still runs as a fallback)
    linger_ms: int = 10  # OUTBOX_RELAY_LINGER_MS: after a NOTIFY, wait this long so a burst is one round
    max_attempts: int = 5  # OUTBOX_RELAY_MAX_ATTEMPTS: failed publishes of one event before it is parked
    backoff_initial: float = 0.2  # OUTBOX_RELAY_BACKOFF_INITIAL: first wait after an outage, seconds
    backoff_max: float = 10.0  # OUTBOX_RELAY_BACKOFF_MAX: longest wait between retries, seconds
    lease_ttl: float = 3.0  # OUTBOX_RELAY_LEASE_TTL: seconds a shard lease lasts unrenewed (failover time)
    relay_id: str = field(  # OUTBOX_RELAY_ID: unique per process
        default_factory=default_relay_id, metadata={"env": "OUTBOX_RELAY_ID"}
    )
    metrics_port: int = 0  # OUTBOX_RELAY_METRICS_PORT: serve /metrics, /livez, /readyz here; 0 = off
    metrics_host: str = "127.0.0.1"  # OUTBOX_RELAY_METRICS_HOST: address those endpoints bind
    liveness_timeout: float = 60.0  # OUTBOX_RELAY_LIVENESS_TIMEOUT: /livez fails after this long without progress
    publisher: str = "kafka-python"  # OUTBOX_RELAY_PUBLISHER: kafka-python | confluent | rabbitmq (extras)
    rabbitmq_url: str | None = field(  # OUTBOX_RABBITMQ_URL: amqp(s)://..., for the rabbitmq publisher
        default=None, metadata={"env": None}
    )
    kafka: Mapping[str, Any] = field(  # OUTBOX_KAFKA_*: producer pass-through
        default_factory=dict, metadata={"env": None}
    )

    def __post_init__(self) -> None:
        if not 1 <= self.batch_size <= 10_000:
            raise ConfigError("batch_size", f"{self.batch_size} is out of range 1..10000")
        if not 1 <= self.max_in_flight <= 64:
            raise ConfigError("max_in_flight", f"{self.max_in_flight} is out of range 1..64")
        if not 0.01 <= self.poll_interval <= 60:
            raise ConfigError("poll_interval", f"{self.poll_interval} is out of range 0.01..60 s")
        if not 1 <= self.max_attempts <= 1000:
            raise ConfigError("max_attempts", f"{self.max_attempts} is out of range 1..1000")
        # Each check names the one value that is wrong, so that the error can name
        # the variable it came from (outbox.config.settings_from_env).
        if not 0 < self.backoff_initial <= 600:
            raise ConfigError("backoff_initial", f"{self.backoff_initial} is out of range (0..600] s")
        if not self.backoff_initial <= self.backoff_max <= 600:
            raise ConfigError(
                "backoff_max", f"the longest backoff {self.backoff_max} s (OUTBOX_RELAY_BACKOFF_MAX) "
                f"must lie between the initial backoff {self.backoff_initial} s "
                "(OUTBOX_RELAY_BACKOFF_INITIAL) and 600 s",
                related=("backoff_initial",),
            )
        if not 0 <= self.linger_ms <= 1000:
            raise ConfigError("linger_ms", f"{self.linger_ms} is out of range 0..1000 ms")
        if not self.source:
            raise ConfigError("source", "must not be empty")
        if not 0.3 <= self.lease_ttl <= 300:
            raise ConfigError("lease_ttl", f"{self.lease_ttl} is out of range 0.3..300 s")
        if self.publisher not in PUBLISHERS:
            raise ConfigError(
                "publisher", f"{self.publisher!r} is not one of {', '.join(PUBLISHERS)}"
            )
        if not self.relay_id:
            raise ConfigError("relay_id", "must not be empty")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError("metrics_port", f"{self.metrics_port} is out of range 0..65535 (0 = off)")
        if not 1 <= self.liveness_timeout <= 3600:
            raise ConfigError("liveness_timeout", f"{self.liveness_timeout} is out of range 1..3600 s")
        if self.publisher == RABBITMQ:
            if not self.rabbitmq_url:
                raise ConfigError(RABBITMQ_URL_ENV, "not set; the rabbitmq publisher needs amqp://...")
        elif not self.bootstrap_servers:
            raise ConfigError(
                BOOTSTRAP_SERVERS_ENV, "not set; pass host:port[,host:port...] of your Kafka brokers"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> RelayConfig:
        """Settings from OUTBOX_RELAY_* (and the shared OUTBOX_*) variables; keyword
        arguments that are not None win. An error names the variable it came from."""
        env = os.environ if env is None else env
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:  # the generic reader would skip a misspelt keyword in silence
            raise TypeError(f"RelayConfig.from_env() got unknown settings: {', '.join(sorted(unknown))}")
        url = database_url(overrides.get("database_url"), env)
        rabbit = (overrides.get("publisher") or env.get("OUTBOX_RELAY_PUBLISHER")) == RABBITMQ
        if rabbit:  # Kafka's address is optional then, RabbitMQ's required
            overrides["rabbitmq_url"] = rabbitmq_url(overrides.get("rabbitmq_url"), env)
        servers = (overrides.get("bootstrap_servers") or env.get(BOOTSTRAP_SERVERS_ENV, "") if rabbit
                   else bootstrap_servers(overrides.get("bootstrap_servers"), env))
        kafka = kafka_client_config(env)  # read (and refused if wrong) even when `kafka` is given
        return settings_from_env(cls, "OUTBOX_RELAY_", env, **{
            **overrides, "database_url": url, "bootstrap_servers": servers,
            "kafka": kafka if overrides.get("kafka") is None else overrides["kafka"],
        })

    def describe(self) -> str:
        """One log line, secrets masked."""
        broker = (f"rabbitmq={safe_url(self.rabbitmq_url)}" if self.publisher == RABBITMQ and self.rabbitmq_url
                  else f"kafka={self.bootstrap_servers}")
        return (
            f"database={safe_url(self.database_url)} {broker} "
            f"batch_size={self.batch_size} max_in_flight={self.max_in_flight} poll_interval={self.poll_interval}s "
            f"listen={self.listen} linger_ms={self.linger_ms} max_attempts={self.max_attempts} "
            f"lease_ttl={self.lease_ttl}s relay_id={self.relay_id} publisher={self.publisher} "
            f"metrics={f'{self.metrics_host}:{self.metrics_port}' if self.metrics_port else 'off'} "
            f"kafka_overrides={safe_kafka_config(self.kafka)}"
        )

    def __repr__(self) -> str:  # the dataclass repr would print the database password
        return f"RelayConfig({self.describe()})"
