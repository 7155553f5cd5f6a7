"""The consumer's settings: its own (`ConsumerConfig`), its counters (`ConsumerStats`), Kafka's.

    ConsumerConfig(...)                    retries, waits, poll and transaction sizes; checked here
    ConsumerConfig.from_env(env)           the same from OUTBOX_CONSUMER_<FIELD>
    ConsumerStats                          what the consumer counts, for whoever reads it
    kafka_consumer_settings(group, ...)    the KafkaConsumer arguments, with what the kit insists on

This module never talks to Kafka or the database; it only decides what the
consumer may be started with, and refuses (ConfigError, naming the setting)
what would break the guarantees: auto-committed offsets, deserializers that
hide the raw bytes a dead letter must keep.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kafka import KafkaConsumer

from outbox.config import kafka_client_config, settings_from_env
from outbox.errors import ConfigError

__all__ = ["ENV_PREFIX", "ConsumerConfig", "ConsumerStats", "kafka_consumer_settings"]

ENV_PREFIX = "OUTBOX_CONSUMER_"


@dataclass(frozen=True, kw_only=True, slots=True)
class ConsumerConfig:
    """How the consumer retries, waits and polls. Every field has a default.

    Example::

        Consumer(engine, group="ledger", topics=["payments"], handler=apply_payment,
                 config=ConsumerConfig(max_attempts=3, retry_backoff_max=5.0))

    `from_env()` reads the same fields from `OUTBOX_CONSUMER_<FIELD>`, e.g.
    `OUTBOX_CONSUMER_MAX_ATTEMPTS=3`.

    `transaction_batch_size` 1 gives a transaction per message. Larger
    batches save a COMMIT (a WAL flush) per message; the price is paid on a
    handler failure, which rolls back and re-runs the batch's earlier
    messages, and in locks the handlers' writes hold until the batch commits.
    """

    max_attempts: int = 5  # handler attempts before the message is dead-lettered; 1..100
    retry_backoff_base: float = 0.2  # s; retry n waits random(0, base * 2**(n-1)); 0..3600
    retry_backoff_max: float = 10.0  # s; cap of one handler retry wait; base..3600
    db_backoff_base: float = 0.5  # s; first wait while the database is unreachable; >0..3600
    db_backoff_max: float = 30.0  # s; cap of one such wait; db_backoff_base..3600
    poll_batch_size: int = 100  # max messages per poll (kafka max_poll_records); 1..10000
    poll_timeout_ms: int = 1000  # run()'s wait per poll, bounds stop() latency; 1..60000
    transaction_batch_size: int = 50  # messages per DB transaction (see above); 1..10000

    def __post_init__(self) -> None:
        _check_range("max_attempts", self.max_attempts, 1, 100)
        _check_range("retry_backoff_base", self.retry_backoff_base, 0.0, 3600.0)
        _check_range("retry_backoff_max", self.retry_backoff_max, self.retry_backoff_base, 3600.0)
        if self.db_backoff_base <= 0:
            # A zero wait would turn a database outage into a busy loop.
            raise ConfigError(
                "db_backoff_base", f"must be above 0 seconds, got {self.db_backoff_base}"
            )
        _check_range("db_backoff_base", self.db_backoff_base, 0.0, 3600.0)
        _check_range("db_backoff_max", self.db_backoff_max, self.db_backoff_base, 3600.0)
        _check_range("poll_batch_size", self.poll_batch_size, 1, 10_000)
        _check_range("poll_timeout_ms", self.poll_timeout_ms, 1, 60_000)
        _check_range("transaction_batch_size", self.transaction_batch_size, 1, 10_000)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ConsumerConfig:
        """The config from `OUTBOX_CONSUMER_*` variables; unset ones keep their default.

        Errors name the variable, e.g. `OUTBOX_CONSUMER_MAX_ATTEMPTS: must be between ...`.
        """
        return settings_from_env(cls, ENV_PREFIX, env)


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(name, f"must be between {low} and {high}, got {value}")


@dataclass(slots=True)
class ConsumerStats:
    """Counters since the consumer was created. Read them; the consumer writes them."""

    applied: int = 0  # handler ran and its transaction committed
    duplicates: int = 0  # event id already in this group's inbox; handler skipped
    dead_lettered: int = 0  # parked in outbox_dead_letter (handler kept failing, or malformed)
    retries: int = 0  # handler attempts that failed and were retried
    database_waits: int = 0  # backoffs because the database did not answer


def kafka_consumer_settings(
    group: str, servers: str, config: ConsumerConfig, overrides: Mapping[str, Any]
) -> dict[str, Any]:
    """The KafkaConsumer arguments: the kit's, then `OUTBOX_KAFKA_*`, then `overrides`.

    Raises ConfigError for an unknown setting, a second `group_id`,
    `enable_auto_commit` other than False, or a deserializer.
    """
    known = KafkaConsumer.DEFAULT_CONFIG
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ConfigError(unknown[0], "is not a KafkaConsumer setting")
    settings: dict[str, Any] = {
        "bootstrap_servers": servers,
        "group_id": group,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "isolation_level": "read_committed",
        "max_poll_records": config.poll_batch_size,
        # A broker down at start is waited out by the source (outbox/offsets.py),
        # in steps this long: kafka-python's 30 s would hold up stop() and SIGTERM.
        "bootstrap_timeout_ms": 5_000,
    }
    # OUTBOX_KAFKA_* is shared with the relay's producer: take only what a
    # consumer understands (acks, linger_ms... are the producer's).
    settings.update({k: v for k, v in kafka_client_config().items() if k in known})
    settings.update(overrides)
    if settings["group_id"] != group:
        raise ConfigError("group_id", "is given by the `group` argument; do not pass it twice")
    if settings["enable_auto_commit"] is not False:
        raise ConfigError(
            "enable_auto_commit", "must be False: offsets are committed after the database"
        )
    for name in ("key_deserializer", "value_deserializer"):
        if settings.get(name) is not None:
            raise ConfigError(name, "is not supported: the consumer decodes the raw bytes itself")
    return settings
