"""Pure logic of the consuming side: configuration, handler checks, decoding, error text. No I/O."""

from __future__ import annotations

import functools
import logging
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import create_engine

from outbox.consumer import Consumer
from outbox.consumer_config import ConsumerConfig
from outbox.dead_letters import import_handler, replay_dead_letters
from outbox.envelope import decode, encode_headers
from outbox.errors import ConfigError, MalformedMessageError, describe_error
from outbox.failpoints import parse
from outbox.handler import _ENDS_TRANSACTION, check_handler, handler_name
from outbox.kafka_logging import _FILTER, KAFKA_WIRE_LOGGERS, protect_kafka_logs
from outbox.preflight import login_refused

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


# -- handlers that cannot be handlers --------------------------------------------------


def _two(session: object, event: object) -> None: ...


def _three(session: object, event: object, extra: object) -> None: ...


def _keyword_only(session: object, event: object, *, must: object) -> None: ...


async def _async(session: object, event: object) -> None: ...


async def _async_gen(session: object, event: object) -> Any:
    yield None


def _gen(session: object, event: object) -> Any:
    yield None


class _AsyncCallable:
    async def __call__(self, session: object, event: object) -> None: ...


class _Callable:
    def __call__(self, session: object, event: object) -> None: ...


@pytest.mark.parametrize(
    ("handler", "says"),
    [
        ("tests.consumer_proc:record_effect", "is not callable"),
        (lambda session: None, "cannot be called as handler(session, event)"),
        (_three, "cannot be called as handler(session, event)"),
        (_keyword_only, "missing a required argument: 'must'"),
        (_async, "is an async function"),
        (_async_gen, "is an async function"),
        (_AsyncCallable(), "is an async function"),
        (functools.partial(_async), "is an async function"),
        (_gen, "is a generator function"),
    ],
    ids=["a string", "one argument", "three arguments", "keyword-only", "async def",
         "async generator", "async __call__", "partial of async", "generator"],
)
def test_consumer_refuses_what_cannot_be_a_handler_in_one_line(handler: Any, says: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Consumer(ENGINE, group="g", topics=["t"], handler=handler, bootstrap_servers="127.0.0.1:9")
    assert raised.value.field == "handler"
    assert says in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize(
    "handler",
    [_two, lambda s, e: None, _Callable(), functools.partial(_three, None), print,
     lambda *args: None],
    ids=["def", "lambda", "callable object", "partial", "builtin", "*args"],
)
def test_consumer_takes_what_can_be_a_handler(handler: Any) -> None:
    check_handler(handler)
    Consumer(ENGINE, group="g", topics=["t"], handler=handler, bootstrap_servers="127.0.0.1:9")


def test_replay_refuses_an_async_handler_before_touching_the_database() -> None:
    with pytest.raises(ConfigError) as raised:
        replay_dead_letters(ENGINE, group="g", handler=_async)
    assert raised.value.field == "handler"


@pytest.mark.parametrize(
    ("statement", "ends"),
    [
        ("COMMIT", True), ("  commit;", True), ("END", True), ("ABORT", True),
        ("ROLLBACK", True), ("rollback work", True), ("PREPARE TRANSACTION 'x'", True),
        ("SELECT 1; COMMIT", True), ("-- note\nCOMMIT", True), ("/* a */ COMMIT", True),
        ("ROLLBACK TO SAVEPOINT sa_savepoint_1", False), ("RELEASE SAVEPOINT sa_1", False),
        ("SAVEPOINT sa_1", False), ("COMMENT ON TABLE t IS 'x'", False),
        ("INSERT INTO ledger (endpoint) VALUES (%(e)s)", False), ("SELECT commit_ts FROM t", False),
    ],
)
def test_statements_that_end_the_transaction_are_recognised(statement: str, ends: bool) -> None:
    assert bool(_ENDS_TRANSACTION.search(statement)) is ends


def test_handler_name_is_what_import_handler_takes() -> None:
    assert handler_name(_two) == "tests.unit.test_consumer_units:_two"
    assert handler_name(functools.partial(_three, None)) == "tests.unit.test_consumer_units:_three"
    assert handler_name(_Callable()) == "tests.unit.test_consumer_units:_Callable"


# -- messages publish never writes -------------------------------------------------------


def _headers(content_type: str = "application/json") -> list[tuple[str, bytes]]:
    return encode_headers(event_id=uuid.uuid4(), type="payment.captured", source="/t",
                          time=datetime.now(UTC), content_type=content_type, headers={})


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        (b"k", b"[NaN]", "NaN is not a JSON number"),
        (b"k", b'{"a": Infinity}', "Infinity is not a JSON number"),
        (b"k", b'{"a": -Infinity}', "-Infinity is not a JSON number"),
        (b"k", '{"a": 1}'.encode("utf-16"), "not valid application/json"),
        (None, b"{}", "message has no key"),
        (b"", b"{}", "message key is empty"),
        (b"  ", b"{}", "message key is empty"),
    ],
)
def test_decode_refuses_what_publish_never_writes(key: bytes | None, value: bytes, says: str) -> None:
    with pytest.raises(MalformedMessageError) as raised:
        decode(topic="t", partition=0, offset=0, key=key, value=value, headers=_headers())
    assert says in str(raised.value)


def test_decode_takes_what_publish_writes_and_other_content_types_as_bytes() -> None:
    event = decode(topic="t", partition=0, offset=0, key="acct-€".encode(),
                   value='{"amount": 1.5, "note": "é"}'.encode(), headers=_headers())
    assert event.key == "acct-€" and event.data == {"amount": 1.5, "note": "é"}
    raw = decode(topic="t", partition=0, offset=0, key=b"k", value=b"NaN",
                 headers=_headers("text/plain"))
    assert raw.data == b"NaN"


# -- a database that is wrong, not down ----------------------------------------------------


@pytest.mark.parametrize(
    ("message", "refused"),
    [
        ('connection failed: connection to server at "127.0.0.1", port 5432 failed: FATAL:  '
         'password authentication failed for user "ledger"',
         'password authentication failed for user "ledger"'),
        ('connection failed: connection to server at "db", port 5432 failed: FATAL:  database '
         '"ledgr" does not exist', 'database "ledgr" does not exist'),
        ('connection failed: connection to server at "db", port 5432 failed: server does not '
         'support SSL, but SSL was required', "server does not support SSL, but SSL was required"),
        ('connection failed: connection to server at "db", port 5432 failed: FATAL:  no '
         'pg_hba.conf entry for host "10.0.0.9", user "ledger", database "pay", no encryption',
         'no pg_hba.conf entry for host "10.0.0.9", user "ledger", database "pay", no encryption'),
        ('connection failed: connection to server at "db", port 5432 failed: Connection refused',
         None),
        ("connection failed: connection to server at \"db\", port 5432 failed: timeout expired",
         None),
        ("the database system is starting up", None),
        ("SSL SYSCALL error: EOF detected", None),
    ],
)
def test_login_refused_tells_wrong_from_down(message: str, refused: str | None) -> None:
    assert login_refused(RuntimeError(message)) == refused


# -- kafka-python's DEBUG logs ---------------------------------------------------------------


def test_kafka_wire_logs_keep_no_sasl_bytes_payloads_or_config_secrets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # kafka-python's own code paths, no broker: the parser logs each request
    # it encodes and the bytes it hands to the socket.
    from kafka.protocol.parser import KafkaProtocol
    from kafka.protocol.sasl import SaslAuthenticateRequest

    protect_kafka_logs()
    protect_kafka_logs()  # idempotent
    for name in KAFKA_WIRE_LOGGERS:
        assert logging.getLogger(name).filters.count(_FILTER) == 1
    caplog.set_level(logging.DEBUG)
    # An in-process relay daemon run (the CLI tests) mutes "kafka" itself.
    caplog.set_level(logging.DEBUG, logger="kafka")
    for name in KAFKA_WIRE_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET)
    parser = KafkaProtocol(client_id="t", ident="node=1")
    parser.send_request(SaslAuthenticateRequest(auth_bytes=b"u\x00u\x00hunter2-pw", version=2))
    parser.send_bytes()
    logging.getLogger("kafka.producer.kafka").debug(
        "%s: Sending (key=%r value=%r headers=%r) to %s", "producer-1", b"acct", b'{"pan": "4111"}',
        [], "payments-0")
    logging.getLogger("kafka.admin.client").debug(
        "Starting KafkaAdminClient with configuration: %s", {"sasl_plain_password": "hunter2-pw",
                                                             "client_id": "admin"})
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "hunter2-pw" not in text and "4111" not in text
    assert "<SaslAuthenticateRequest, contents not logged>" in text
    assert "bytes, not logged>" in text and "'client_id': 'admin'" in text
    assert "Sending a record (key, value and headers not logged) to payments-0" in text


def test_any_record_of_the_kafka_record_shape_decodes_into_an_event() -> None:
    from dataclasses import dataclass

    from outbox.records import KafkaRecord, decode_record, try_decode, where

    @dataclass(frozen=True)
    class Record:  # what a test or another client library may hand the consumer
        topic: str
        partition: int
        offset: int
        key: bytes | None
        value: bytes | None
        headers: list[tuple[str, bytes]]

    event_id = uuid.uuid4()
    headers = encode_headers(event_id=event_id, type="payment.captured", source="/tests",
                             time=datetime.now(UTC), content_type="application/json", headers={})
    good: KafkaRecord = Record("payments", 2, 41, b"acct-1", b'{"amount": 1}', headers)
    event = decode_record(good)
    assert (event.id, event.topic, event.partition, event.offset, event.data) == (
        event_id, "payments", 2, 41, {"amount": 1}
    )
    assert isinstance(try_decode(Record("payments", 2, 42, None, b"{}", [])), MalformedMessageError)
    assert where(good, 3) == "topic=payments partition=2 offset=41 messages=3"


def test_consumer_config_from_env_reads_through_the_generic_reader_and_names_the_variable() -> None:
    config = ConsumerConfig.from_env({"OUTBOX_CONSUMER_RETRY_BACKOFF_BASE": "0.5",
                                      "OUTBOX_CONSUMER_POLL_TIMEOUT_MS": ""})
    assert config.retry_backoff_base == 0.5 and config.poll_timeout_ms == 1000
    for raw in ("nan", "inf"):
        with pytest.raises(ConfigError) as raised:
            ConsumerConfig.from_env({"OUTBOX_CONSUMER_DB_BACKOFF_MAX": raw})
        assert raised.value.field == "OUTBOX_CONSUMER_DB_BACKOFF_MAX"
