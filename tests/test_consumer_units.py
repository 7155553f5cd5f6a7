"""Pure logic of the consuming side: configuration, failpoint specs, error text. No I/O."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import create_engine

from outbox.consumer import Consumer, ConsumerConfig
from outbox.dead_letters import import_handler
from outbox.errors import ConfigError, describe_error
from outbox.failpoints import parse

# Never connected to: Consumer() talks to nothing until run_once().
ENGINE = create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": 101}, "max_attempts"),
        ({"retry_backoff_base": -1.0}, "retry_backoff_base"),
        ({"retry_backoff_base": 5.0, "retry_backoff_max": 1.0}, "retry_backoff_max"),
        ({"db_backoff_base": 0.0}, "db_backoff_base"),
        ({"db_backoff_max": 0.1}, "db_backoff_max"),
        ({"poll_batch_size": 0}, "poll_batch_size"),
        ({"poll_timeout_ms": 0}, "poll_timeout_ms"),
        ({"transaction_batch_size": 0}, "transaction_batch_size"),
        ({"transaction_batch_size": 10_001}, "transaction_batch_size"),
    ],
)
def test_config_errors_name_the_field(values: dict[str, float], field: str) -> None:
    with pytest.raises(ConfigError) as raised:
        ConsumerConfig(**values)  # type: ignore[arg-type]
    assert raised.value.field == field
    assert str(raised.value).startswith(f"{field}: ")


def test_config_is_frozen_and_keyword_only() -> None:
    config = ConsumerConfig()
    with pytest.raises(AttributeError):
        config.max_attempts = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        ConsumerConfig(3)  # type: ignore[call-arg]


def test_config_from_env_reads_outbox_consumer_variables() -> None:
    assert ConsumerConfig.from_env({}) == ConsumerConfig()
    config = ConsumerConfig.from_env(
        {"OUTBOX_CONSUMER_MAX_ATTEMPTS": "3", "OUTBOX_CONSUMER_RETRY_BACKOFF_MAX": "2.5",
         "OUTBOX_CONSUMER_POLL_BATCH_SIZE": "10", "OUTBOX_CONSUMER_TRANSACTION_BATCH_SIZE": "1"}
    )
    assert (config.max_attempts, config.retry_backoff_max, config.poll_batch_size) == (3, 2.5, 10)
    assert config.transaction_batch_size == 1
    assert ConsumerConfig().transaction_batch_size == 50


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"OUTBOX_CONSUMER_MAX_ATTEMPTS": "many"}, "OUTBOX_CONSUMER_MAX_ATTEMPTS"),
        ({"OUTBOX_CONSUMER_MAX_ATTEMPTS": "500"}, "OUTBOX_CONSUMER_MAX_ATTEMPTS"),
        ({"OUTBOX_CONSUMER_DB_BACKOFF_BASE": "0"}, "OUTBOX_CONSUMER_DB_BACKOFF_BASE"),
        ({"OUTBOX_CONSUMER_TRANSACTION_BATCH_SIZE": "0"}, "OUTBOX_CONSUMER_TRANSACTION_BATCH_SIZE"),
    ],
)
def test_config_from_env_errors_name_the_variable(env: dict[str, str], field: str) -> None:
    with pytest.raises(ConfigError) as raised:
        ConsumerConfig.from_env(env)
    assert raised.value.field == field


def make(**kwargs: Any) -> Consumer:
    return Consumer(
        ENGINE, group="g", topics=["t"], handler=lambda s, e: None,
        bootstrap_servers="127.0.0.1:9", config=ConsumerConfig(), **kwargs,
    )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"enable_auto_commit": True}, "enable_auto_commit"),
        ({"group_id": "other"}, "group_id"),
        ({"value_deserializer": bytes.decode}, "value_deserializer"),
        ({"acks": "all"}, "acks"),  # a producer setting
        ({"max_poll_interval_ms": 20_000}, "retry_backoff_max"),  # retries outlast a poll
    ],
)
def test_consumer_refuses_kafka_settings_that_break_the_guarantees(
    kwargs: dict[str, object], field: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        make(**kwargs)
    assert raised.value.field == field


def test_consumer_needs_a_group_and_topics() -> None:
    with pytest.raises(ConfigError) as raised:
        Consumer(ENGINE, group="", topics=["t"], handler=lambda s, e: None,
                 bootstrap_servers="127.0.0.1:9")
    assert raised.value.field == "group"
    with pytest.raises(ConfigError) as raised:
        Consumer(ENGINE, group="g", topics="t", handler=lambda s, e: None,
                 bootstrap_servers="127.0.0.1:9")
    assert raised.value.field == "topics"


def test_kafka_env_pass_through_keeps_only_consumer_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OUTBOX_KAFKA_ACKS", "all")  # the relay's producer setting
    monkeypatch.setenv("OUTBOX_KAFKA_SESSION_TIMEOUT_MS", "7000")
    monkeypatch.setenv("OUTBOX_KAFKA_CLIENT_ID", "ledger-1")
    consumer = make(client_id="explicit-wins")
    settings = consumer._kafka_config
    assert settings["session_timeout_ms"] == 7000
    assert settings["client_id"] == "explicit-wins"
    assert "acks" not in settings
    assert settings["enable_auto_commit"] is False
    assert settings["isolation_level"] == "read_committed"
    assert settings["auto_offset_reset"] == "earliest"


def test_failpoint_spec_parsing() -> None:
    assert parse("") == {}
    assert parse("consumer-after-db-commit") == {"consumer-after-db-commit": 1}
    assert parse("consumer-after-db-commit:3, relay-after-ack") == {
        "consumer-after-db-commit": 3, "relay-after-ack": 1,
    }
    for bad in ("x:0", "x:two", ":3"):
        with pytest.raises(ConfigError) as raised:
            parse(bad)
        assert raised.value.field == "OUTBOX_FAILPOINT"


def test_error_descriptions_are_one_line_without_secrets() -> None:
    exc = RuntimeError(
        "cannot reach postgresql://ledger:s3cret@db:5432/pay password=hunter2\n"
        "[SQL: INSERT INTO card (pan) VALUES (%(pan)s)] [parameters: {'pan': '4111...'}]"
    )
    text = describe_error(exc)
    assert text == "RuntimeError: cannot reach postgresql://ledger:***@db:5432/pay password=***"
    assert len(describe_error(ValueError("x" * 5000))) == 500


def test_import_handler_resolves_module_colon_function() -> None:
    assert import_handler("tests.consumer_proc:record_effect").__name__ == "record_effect"
    for bad in ("tests.consumer_proc", "tests.consumer_proc:missing", "no_such_module:f",
                "tests.consumer_proc:EFFECT_TABLE_DDL"):
        with pytest.raises(ConfigError) as raised:
            import_handler(bad)
        assert raised.value.field == "handler"
