"""The relay's pure logic: settings, the publisher table, the backoff curve, what is
imported when, where names live. No service is reached."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from outbox.errors import ConfigError
from relay import RelayConfig, store
from relay.kafka import producer_config

_BASE_ENV = {"OUTBOX_DATABASE_URL": "postgresql+psycopg://u:p@db/x", "OUTBOX_KAFKA_BOOTSTRAP_SERVERS": "k:9092"}


@pytest.mark.parametrize(
    ("override", "setting"),
    [
        ({"acks": 1}, "OUTBOX_KAFKA_ACKS"),
        ({"enable_idempotence": False}, "OUTBOX_KAFKA_ENABLE_IDEMPOTENCE"),
        ({"max_in_flight_requests_per_connection": 6}, "OUTBOX_KAFKA_MAX_IN_FLIGHT_REQUESTS_PER_CONNECTION"),
        ({"retries": 0}, "OUTBOX_KAFKA_RETRIES"),
        ({"transactional_id": "x"}, "OUTBOX_KAFKA_TRANSACTIONAL_ID"),
    ],
)
def test_relay_refuses_settings_that_break_order_or_idempotence(
    override: dict[str, object], setting: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        producer_config("127.0.0.1:9092", override)
    assert raised.value.field == setting


def test_relay_config_never_shows_the_password() -> None:
    config = RelayConfig(
        database_url="postgresql+psycopg://app:s3cret@db/payments",
        bootstrap_servers="k:9092",
        kafka={"sasl_plain_password": "hunter2"},
    )
    assert "s3cret" not in repr(config) and "hunter2" not in repr(config)
    with pytest.raises(ConfigError, match="batch_size"):
        RelayConfig(database_url="postgresql://x/y", bootstrap_servers="k:1", batch_size=0)


def test_confluent_publisher_refuses_unsafe_settings() -> None:
    from relay.confluent import confluent_config

    with pytest.raises(ConfigError):
        confluent_config("127.0.0.1:9092", {"acks": 1})


def test_every_publisher_name_is_a_line_of_the_table_and_the_config_takes_exactly_those() -> None:
    from relay.publishers import PUBLISHERS

    assert set(PUBLISHERS) == {"kafka-python", "confluent", "rabbitmq"}
    for name in PUBLISHERS:
        RelayConfig(database_url="postgresql://x/y", bootstrap_servers="k:1", publisher=name,
                    rabbitmq_url="amqp://u@h/v")
    with pytest.raises(ConfigError, match="kafka-python, confluent, rabbitmq"):
        RelayConfig(database_url="postgresql://x/y", bootstrap_servers="k:1", publisher="rabbit")


def test_a_publisher_whose_client_is_not_installed_is_one_line_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from relay import publishers

    monkeypatch.setitem(
        publishers.PUBLISHERS, "absent",
        publishers.Transport("relay.no_such_transport:Publisher", "absent-client", "absent"),
    )
    config = RelayConfig(database_url="postgresql://x/y", bootstrap_servers="k:1", publisher="absent")
    with pytest.raises(ConfigError) as raised:
        publishers.make_publisher(config)
    assert raised.value.field == "OUTBOX_RELAY_PUBLISHER"
    assert str(raised.value) == (
        "OUTBOX_RELAY_PUBLISHER: absent needs the absent-client package: "
        "pip install 'outbox-kit[absent]'"
    )


def test_a_publisher_is_imported_only_when_a_relay_chooses_it() -> None:
    """A third transport's client library stays optional: making and checking a
    config imports no Kafka client, making the relay imports only the chosen one."""
    import subprocess
    import sys

    from tests.kafka_helpers import REPO

    script = (
        "import sys\n"
        "from relay.config import RelayConfig\n"
        "from relay.publishers import make_publisher\n"
        "config = RelayConfig(database_url='postgresql://x/y', bootstrap_servers='k:1')\n"
        "clients = ('relay.kafka', 'relay.confluent', 'confluent_kafka')\n"
        "assert not [m for m in clients if m in sys.modules], sys.modules\n"
        "make_publisher(config).close()\n"
        "assert 'relay.kafka' in sys.modules\n"
        "assert 'relay.confluent' not in sys.modules and 'confluent_kafka' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", script], cwd=REPO, check=True, timeout=60)


def test_the_backoff_curve_doubles_from_base_up_to_cap_with_at_most_base_of_jitter() -> None:
    from tenacity import RetryCallState, Retrying

    from outbox.backoff import backoff

    wait = backoff(0.2, 1.0)
    state = RetryCallState(retry_object=Retrying(), fn=None, args=(), kwargs={})
    for attempt, steady in [(1, 0.2), (2, 0.4), (3, 0.8), (4, 1.0), (30, 1.0)]:
        state.attempt_number = attempt
        waits = [wait(state) for _ in range(200)]
        assert all(steady <= w <= steady + 0.2 for w in waits), (attempt, min(waits), max(waits))
        assert max(waits) - min(waits) > 0.05  # jittered: relays restarted together drift apart
    # The same curve for loops that count their own failures (the consumers' sources).
    from outbox.backoff import backoff_delay

    for attempt, steady in [(1, 0.2), (3, 0.8), (30, 1.0)]:
        assert all(steady <= backoff_delay(0.2, 1.0, attempt) <= steady + 0.2 for _ in range(50))


def test_the_relay_statements_take_their_table_names_from_the_schema() -> None:
    """One home for table names: a table renamed in outbox/schema.py is renamed in
    every relay statement, and no string in relay/store.py spells one again."""
    import ast

    from outbox.schema import metadata

    tables = {t.name for t in metadata.tables.values()}
    tree = ast.parse(Path(store.__file__).read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef))
                  and node.body and isinstance(node.body[0], ast.Expr)}
    spelled = [node.value for node in ast.walk(tree)
               if isinstance(node, ast.Constant) and isinstance(node.value, str)
               and id(node) not in docstrings
               and tables & set(re.findall(r"\w+", node.value))]
    assert spelled == []
    assert set(store._TABLES) <= tables and f"FROM {store.EVENT}\n" in store._FETCH_SHARDS


def test_the_version_table_has_one_name_for_the_cli_and_for_plain_alembic() -> None:
    """`outbox db ...` and `alembic -c alembic.ini` must record the revision in the
    same table, or each would think the other's database is unmigrated."""
    from outbox import migrate, schema

    assert migrate.VERSION_TABLE is schema.VERSION_TABLE
    env_py = (Path(migrate.__file__).parent.parent / "migrations" / "env.py").read_text()
    assert "from outbox.schema import VERSION_TABLE" in env_py and schema.VERSION_TABLE not in env_py


def test_a_retry_log_line_sees_the_failure_and_the_wait_that_follows_it() -> None:
    from tenacity import Retrying, stop_after_attempt

    from outbox.backoff import backoff, next_retry

    slept: list[float] = []
    seen: list[tuple[BaseException | None, float]] = []
    calls = iter([OSError("broker down"), OSError("still down"), None])

    def flaky() -> str:
        failure = next(calls)
        if failure is not None:
            raise failure
        return "ok"

    retrying = Retrying(wait=backoff(0.2, 1.0), stop=stop_after_attempt(5), sleep=slept.append,
                        before_sleep=lambda state: seen.append(next_retry(state)), reraise=True)
    assert retrying(flaky) == "ok"
    assert [str(exc) for exc, _ in seen] == ["broker down", "still down"]
    assert [wait for _, wait in seen] == slept and 0.2 <= slept[0] <= 0.4 <= slept[1] <= 0.6


def test_relay_listen_takes_the_boolean_words_and_refuses_others() -> None:
    base = {"OUTBOX_DATABASE_URL": "postgresql+psycopg://u:p@db/x",
            "OUTBOX_KAFKA_BOOTSTRAP_SERVERS": "k:9092"}
    for word in ("off", "no", "0", "false", "OFF"):
        assert RelayConfig.from_env({**base, "OUTBOX_RELAY_LISTEN": word}).listen is False
    assert RelayConfig.from_env({**base, "OUTBOX_RELAY_LISTEN": "on"}).listen is True
    with pytest.raises(ConfigError, match="OUTBOX_RELAY_LISTEN"):
        RelayConfig.from_env({**base, "OUTBOX_RELAY_LISTEN": "sometimes"})


def test_relay_config_repr_and_describe_never_show_a_secret() -> None:
    config = RelayConfig.from_env({
        "OUTBOX_DATABASE_URL": "postgresql+psycopg://app@db/payments?password=q-s3cret-1",
        "OUTBOX_KAFKA_BOOTSTRAP_SERVERS": "k:9092",
        "OUTBOX_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "OUTBOX_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "OUTBOX_KAFKA_SASL_PLAIN_USERNAME": "relay",
        "OUTBOX_KAFKA_SASL_PLAIN_PASSWORD": "k-s3cret-2",
    })
    for shown in (repr(config), config.describe(), str(config)):
        assert "q-s3cret-1" not in shown and "k-s3cret-2" not in shown
        assert "SCRAM-SHA-512" in shown  # the rest is still there to read


@pytest.mark.parametrize(("variable", "raw", "message"), [
    ("OUTBOX_RELAY_BATCH_SIZE", "0", "OUTBOX_RELAY_BATCH_SIZE: 0 is out of range 1..10000"),
    ("OUTBOX_RELAY_BATCH_SIZE", "lots", "OUTBOX_RELAY_BATCH_SIZE: 'lots' is not an integer"),
    ("OUTBOX_RELAY_POLL_INTERVAL", "inf", "OUTBOX_RELAY_POLL_INTERVAL: 'inf' is not a finite number"),
    ("OUTBOX_RELAY_LEASE_TTL", "0.1", "OUTBOX_RELAY_LEASE_TTL: 0.1 is out of range 0.3..300 s"),
    ("OUTBOX_RELAY_PUBLISHER", "rabbit",
     "OUTBOX_RELAY_PUBLISHER: 'rabbit' is not one of kafka-python, confluent, rabbitmq"),
    ("OUTBOX_RELAY_MAX_IN_FLIGHT", "0", "OUTBOX_RELAY_MAX_IN_FLIGHT: 0 is out of range 1..64"),
    ("OUTBOX_RELAY_METRICS_PORT", "70000",
     "OUTBOX_RELAY_METRICS_PORT: 70000 is out of range 0..65535 (0 = off)"),
    # A check of two values names the one that is wrong, i.e. the variable that was set.
    ("OUTBOX_RELAY_BACKOFF_MAX", "0.1",
     "OUTBOX_RELAY_BACKOFF_MAX: the longest backoff 0.1 s (OUTBOX_RELAY_BACKOFF_MAX) must lie "
     "between the initial backoff 0.2 s (OUTBOX_RELAY_BACKOFF_INITIAL) and 600 s"),
    ("OUTBOX_RELAY_BACKOFF_INITIAL", "20",  # the check is about both: named as the one that was set
     "OUTBOX_RELAY_BACKOFF_INITIAL: the longest backoff 10.0 s (OUTBOX_RELAY_BACKOFF_MAX) must lie "
     "between the initial backoff 20.0 s (OUTBOX_RELAY_BACKOFF_INITIAL) and 600 s"),
    ("OUTBOX_RELAY_BACKOFF_INITIAL", "-1", "OUTBOX_RELAY_BACKOFF_INITIAL: -1.0 is out of range (0..600] s"),
])
def test_a_relay_setting_out_of_range_names_its_variable(variable: str, raw: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        RelayConfig.from_env({**_BASE_ENV, variable: raw})
    assert str(raised.value) == message


def test_relay_settings_from_the_environment_and_keywords_the_keywords_winning() -> None:
    config = RelayConfig.from_env(
        {**_BASE_ENV, "OUTBOX_RELAY_ID": "relay-a", "OUTBOX_RELAY_BATCH_SIZE": "7",
         "OUTBOX_RELAY_SOURCE": "payments", "OUTBOX_KAFKA_LINGER_MS": "3"},
        batch_size=None, poll_interval=0.5, database_url="postgres://v@db2/y",
    )
    assert (config.relay_id, config.batch_size, config.poll_interval, config.source) == (
        "relay-a", 7, 0.5, "payments"
    )
    assert config.database_url == "postgresql+psycopg://v@db2/y"
    assert config.kafka == {"linger_ms": 3}
    assert RelayConfig.from_env({**_BASE_ENV, "OUTBOX_RELAY_ID": ""}).relay_id  # unset: a unique one
    with pytest.raises(ConfigError, match=r"^batch_size: 0 is out of range"):  # a keyword: the field
        RelayConfig.from_env(_BASE_ENV, batch_size=0)
    with pytest.raises(ConfigError, match=r"^OUTBOX_DATABASE_URL: not set"):
        RelayConfig.from_env({"OUTBOX_KAFKA_BOOTSTRAP_SERVERS": "k:9092"})
    with pytest.raises(TypeError, match="batchsize"):  # a misspelt keyword is not dropped in silence
        RelayConfig.from_env(_BASE_ENV, batchsize=3)


def test_the_command_line_runs_db_commands_without_importing_the_relay_daemon() -> None:
    """`outbox db upgrade` used to import relay.daemon (and with it the relay loop,
    psycopg's relay store and kafka-python) just to build its parser, and
    `import outbox` loaded kafka-python with the consumer."""
    import subprocess
    import sys

    from tests.kafka_helpers import REPO

    script = (
        "import sys\n"
        "before = set(sys.modules)\n"
        "from outbox import cli\n"
        "args = cli.build_parser().parse_args(['db', 'upgrade', '--sql'])\n"
        "assert args.command is cli.db_upgrade\n"
        "assert cli.main(['db', 'history']) == 0\n"
        "loaded = set(sys.modules) - before\n"
        "heavy = [m for m in loaded if m.split('.')[0] in ('kafka', 'confluent_kafka')\n"
        "         or m in ('relay.relay', 'relay.daemon', 'relay.kafka', 'relay.confluent',\n"
        "                  'relay.store', 'relay.leases')]\n"
        "assert not heavy, sorted(heavy)\n"
        "assert 'relay.relay' not in sys.modules and 'relay.daemon' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--metrics-port", "99999"], "outbox relay: --metrics-port: 99999 is out of range 0..65535 (0 = off)"),
    (["--poll-interval", "100"], "outbox relay: --poll-interval: 100.0 is out of range 0.01..60 s"),
    (["--batch-size", "20000"], "outbox relay: --batch-size: 20000 is out of range 1..10000"),
])
def test_a_relay_option_out_of_range_is_named_as_the_option(args: list[str], message: str) -> None:
    # Refused before any connection: no service needed, and the password never shows.
    import subprocess
    import sys

    env = {"PATH": "/usr/bin:/bin", "OUTBOX_DATABASE_URL": "postgresql+psycopg://u:opt-secret-9@db/x",
           "OUTBOX_KAFKA_BOOTSTRAP_SERVERS": "k:9092"}
    done = subprocess.run([sys.executable, "-m", "relay", *args], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert (done.returncode, done.stderr.strip().splitlines()[-1]) == (2, message)
    assert "opt-secret-9" not in done.stdout + done.stderr
