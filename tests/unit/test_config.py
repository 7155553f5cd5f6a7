"""Settings read as what they are: `OUTBOX_*` parsing, URL handling, secret masking. No I/O."""

from __future__ import annotations

import dataclasses

import pytest

from outbox.config import (
    database_url,
    env_bool,
    env_float,
    kafka_client_config,
    safe_kafka_config,
    safe_url,
    settings_from_env,
)
from outbox.errors import ConfigError, describe_error


def test_kafka_settings_are_converted_by_the_clients_own_type() -> None:
    config = kafka_client_config({
        "OUTBOX_KAFKA_SASL_PLAIN_PASSWORD": "123456",
        "OUTBOX_KAFKA_SASL_PLAIN_USERNAME": "007",
        "OUTBOX_KAFKA_CLIENT_ID": "yes",
        "OUTBOX_KAFKA_LINGER_MS": "0",
        "OUTBOX_KAFKA_ENABLE_IDEMPOTENCE": "on",
        "OUTBOX_KAFKA_ACKS": "all",
        "OUTBOX_KAFKA_RETRIES": "5",
        "OUTBOX_KAFKA_API_VERSION": "3.6",
    })
    assert config["sasl_plain_password"] == "123456"
    assert config["sasl_plain_username"] == "007"
    assert config["client_id"] == "yes"
    assert config["linger_ms"] == 0 and config["linger_ms"] is not False
    assert config["enable_idempotence"] is True
    assert config["acks"] == "all"
    assert config["retries"] == 5 and isinstance(config["retries"], int)
    assert config["api_version"] == (3, 6)


def test_a_misspelt_kafka_setting_is_refused_naming_the_variable_not_the_value() -> None:
    with pytest.raises(ConfigError) as err:
        kafka_client_config({"OUTBOX_KAFKA_SASL_PLAIN_PASWORD": "hunter2-secret"})
    assert str(err.value).startswith("OUTBOX_KAFKA_SASL_PLAIN_PASWORD:")
    assert "OUTBOX_KAFKA_SASL_PLAIN_PASSWORD" in str(err.value)  # the hint
    assert "hunter2" not in str(err.value)


@pytest.mark.parametrize(("name", "raw"), [
    ("OUTBOX_KAFKA_LINGER_MS", "soon"),
    ("OUTBOX_KAFKA_ENABLE_IDEMPOTENCE", "maybe"),
    ("OUTBOX_KAFKA_KEY_SERIALIZER", "str"),
    ("OUTBOX_KAFKA_API_VERSION", "new"),
])
def test_kafka_values_the_client_would_refuse_are_refused_at_start(name: str, raw: str) -> None:
    with pytest.raises(ConfigError) as err:
        kafka_client_config({name: raw})
    assert str(err.value).startswith(f"{name}:")


@pytest.mark.parametrize(("raw", "value"), [
    ("true", True), ("1", True), ("yes", True), ("on", True), ("ON", True),
    ("false", False), ("0", False), ("no", False), ("off", False), ("Off", False),
])
def test_one_list_of_boolean_words(raw: str, value: bool) -> None:
    assert env_bool("OUTBOX_RELAY_LISTEN", not value, {"OUTBOX_RELAY_LISTEN": raw}) is value


def test_a_boolean_not_understood_is_refused_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"^OUTBOX_RELAY_LISTEN: 'nope' is not a boolean"):
        env_bool("OUTBOX_RELAY_LISTEN", True, {"OUTBOX_RELAY_LISTEN": "nope"})


def test_non_finite_numbers_are_refused() -> None:
    for raw in ("nan", "inf"):
        with pytest.raises(ConfigError, match="OUTBOX_RELAY_POLL_INTERVAL"):
            env_float("OUTBOX_RELAY_POLL_INTERVAL", 1.0, {"OUTBOX_RELAY_POLL_INTERVAL": raw})


@pytest.mark.parametrize("scheme", ["postgres", "postgresql", "postgresql+psycopg"])
def test_postgres_urls_are_accepted_and_use_psycopg(scheme: str) -> None:
    assert database_url(f"{scheme}://u:p@h:5432/d", {}).startswith("postgresql+psycopg://u:p@h")


def test_other_drivers_and_backends_are_refused() -> None:
    for url in ("postgresql+psycopg2://u@h/d", "mysql://u@h/d"):
        with pytest.raises(ConfigError, match="OUTBOX_DATABASE_URL"):
            database_url(url, {})


def test_safe_url_masks_a_password_given_as_a_query_parameter() -> None:
    shown = safe_url("postgresql+psycopg://app@db/pay?password=s3cr3t-q&sslmode=require")
    assert "s3cr3t-q" not in shown
    assert "password=***" in shown and "sslmode=require" in shown


def test_kafka_config_dump_masks_secrets_by_name_and_by_value() -> None:
    database_url("postgresql://app:db-pw-4242@db/pay", {})
    shown = safe_kafka_config({"sasl_plain_password": "x", "client_id": "db-pw-4242", "acks": "all"})
    assert shown == {"sasl_plain_password": "***", "client_id": "***", "acks": "all"}


def test_describe_error_keeps_one_line_and_masks_query_passwords() -> None:
    exc = RuntimeError("connect to postgresql://u:pw1@h/d?password=pw2 failed\nDETAIL: row (card 4111)")
    text = describe_error(exc)
    assert "pw1" not in text and "pw2" not in text and "4111" not in text


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Example:
    attempts: int = 5
    wait: float = 0.5
    listen: bool = True
    name: str = "x"
    url: str = dataclasses.field(default="", metadata={"env": "OUTBOX_EXAMPLE_URL_OTHER"})
    secret: str = dataclasses.field(default="", metadata={"env": None})

    def __post_init__(self) -> None:
        if not 1 <= self.attempts <= 10:
            raise ConfigError("attempts", f"must be between 1 and 10, got {self.attempts}")


def test_one_reader_parses_each_setting_by_its_fields_type() -> None:
    settings = settings_from_env(_Example, "OUTBOX_EXAMPLE_", {
        "OUTBOX_EXAMPLE_ATTEMPTS": "7", "OUTBOX_EXAMPLE_WAIT": "1.5", "OUTBOX_EXAMPLE_LISTEN": "off",
        "OUTBOX_EXAMPLE_NAME": "007", "OUTBOX_EXAMPLE_URL_OTHER": "u", "OUTBOX_EXAMPLE_SECRET": "no",
    }, wait=None, name="given")
    assert settings == _Example(attempts=7, wait=1.5, listen=False, name="given", url="u", secret="")


@pytest.mark.parametrize(("raw", "message"), [
    ("0", "OUTBOX_EXAMPLE_ATTEMPTS: must be between 1 and 10, got 0"),
    ("many", "OUTBOX_EXAMPLE_ATTEMPTS: 'many' is not an integer"),
])
def test_the_readers_errors_name_the_variable(raw: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        settings_from_env(_Example, "OUTBOX_EXAMPLE_", {"OUTBOX_EXAMPLE_ATTEMPTS": raw})
    assert str(err.value) == message


def test_a_keyword_argument_out_of_range_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"^attempts: "):
        settings_from_env(_Example, "OUTBOX_EXAMPLE_", {}, attempts=0)


def test_describe_error_falls_back_to_the_arguments_of_an_error_that_prints_as_nothing() -> None:
    # pika's AMQPConnectionError: str() is empty, the reason is an argument whose str() is too.
    class Silent(Exception):
        def __str__(self) -> str:
            return ""

    class Reason(Exception):
        def __str__(self) -> str:
            return ""

        def __repr__(self) -> str:
            return "Reason: ConnectionRefusedError(111, 'Connection refused') amqp://u:pw@h/v"

    text = describe_error(Silent(Reason()))
    assert text.endswith("Silent: Reason: ConnectionRefusedError(111, 'Connection refused') amqp://u:***@h/v")
    assert describe_error(Silent()).endswith("Silent: ")  # nothing to say: the type alone
