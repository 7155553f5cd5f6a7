"""Settings shared by the write path, the relay and the consumer.

Every setting can come from a keyword argument or from an `OUTBOX_*`
environment variable; keyword arguments win. Kafka client settings for real
clusters (TLS, SASL, ...) pass through from `OUTBOX_KAFKA_<SETTING>` variables,
named as kafka-python names them, e.g. `OUTBOX_KAFKA_SECURITY_PROTOCOL=SASL_SSL`,
`OUTBOX_KAFKA_SASL_MECHANISM=SCRAM-SHA-512`, `OUTBOX_KAFKA_SASL_PLAIN_USERNAME`,
`OUTBOX_KAFKA_SASL_PLAIN_PASSWORD`, `OUTBOX_KAFKA_SSL_CAFILE`.

This module never logs or formats a secret: `safe_url` and `safe_kafka_config`
are the only way a URL or a Kafka config reaches a log line or an error.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from sqlalchemy.engine import make_url

from outbox.errors import ConfigError

DATABASE_URL_ENV = "OUTBOX_DATABASE_URL"
BOOTSTRAP_SERVERS_ENV = "OUTBOX_KAFKA_BOOTSTRAP_SERVERS"
KAFKA_PREFIX = "OUTBOX_KAFKA_"

_Settings = TypeVar("_Settings")

# A setting whose name holds one of these is a secret ("ssl_keyfile" paths are
# harmless but masked too; "pasw" and "pwd" catch the usual misspellings).
_SECRET_WORDS = ("password", "passwd", "pasw", "pwd", "secret", "token", "key", "credential", "jaas")
_TRUE_WORDS = ("true", "1", "yes", "on")
_FALSE_WORDS = ("false", "0", "no", "off")
BOOL_WORDS = (*_TRUE_WORDS, *_FALSE_WORDS)


def database_url(url: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """The database URL from the argument or `OUTBOX_DATABASE_URL`.

    `postgresql://` and `postgres://` URLs are upgraded to the psycopg 3
    driver, the only one the kit is tested with; another driver is refused.
    The password (in the URL or as a `?password=` parameter) is remembered
    as a secret, so that `safe_kafka_config` and friends mask it anywhere.
    """
    env = os.environ if env is None else env
    value = url or env.get(DATABASE_URL_ENV)
    if not value:
        raise ConfigError(
            DATABASE_URL_ENV,
            "not set; pass a SQLAlchemy URL such as postgresql+psycopg://USER@HOST:5432/DB "
            "(the password in the URL, in PGPASSWORD or in ~/.pgpass)",
        )
    try:
        parsed = make_url(value)
    except Exception:
        raise ConfigError(
            DATABASE_URL_ENV, "is not a valid SQLAlchemy URL (expected postgresql+psycopg://...)"
        ) from None
    backend, _, driver = parsed.drivername.partition("+")
    if backend not in ("postgresql", "postgres"):
        raise ConfigError(
            DATABASE_URL_ENV, f"backend {backend!r} is not supported; use postgresql+psycopg://..."
        )
    if driver not in ("", "psycopg"):
        raise ConfigError(
            DATABASE_URL_ENV,
            f"driver {driver!r} is not supported; the kit needs psycopg 3: postgresql+psycopg://...",
        )
    parsed = parsed.set(drivername="postgresql+psycopg")
    register_secret(parsed.password)
    for name, query_value in parsed.query.items():
        if is_secret(name):
            for item in (query_value,) if isinstance(query_value, str) else query_value:
                register_secret(item)
    return parsed.render_as_string(hide_password=False)


def safe_url(url: str) -> str:
    """The URL with its password (also a `?password=` parameter) replaced by ***, for logs and errors."""
    try:
        parsed = make_url(url)
        masked = {k: ("***" if is_secret(k) else v) for k, v in parsed.query.items()}
        # The URL renderer percent-encodes the query's *** as %2A%2A%2A.
        return parsed.set(query=masked).render_as_string(hide_password=True).replace(
            "%2A%2A%2A", "***"
        )
    except Exception:
        return "<unparseable database URL>"


def bootstrap_servers(value: str | None = None, env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    servers = value or env.get(BOOTSTRAP_SERVERS_ENV)
    if not servers:
        raise ConfigError(
            BOOTSTRAP_SERVERS_ENV, "not set; pass host:port[,host:port...] of your Kafka brokers"
        )
    for server in servers.split(","):
        host, _, port = server.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(
                BOOTSTRAP_SERVERS_ENV, f"{server.strip()!r} is not host:port"
            )
    return servers


def kafka_client_config(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """kafka-python settings passed through from `OUTBOX_KAFKA_*` variables.

    `OUTBOX_KAFKA_BOOTSTRAP_SERVERS` is handled by `bootstrap_servers`; every
    other variable with the prefix must name a setting of kafka-python's
    producer, consumer or admin client, and its text is converted by that
    setting's own type (an int setting gets an int, a bool setting one of
    `BOOL_WORDS`, a string setting the text as it is: a password `007`
    stays `'007'`). A name the client does not know (a typo such as
    `OUTBOX_KAFKA_SASL_PLAIN_PASWORD`) is refused: silently ignored, it
    would leave the client unauthenticated and retrying forever.
    """
    env = os.environ if env is None else env
    known = kafka_settings()
    config: dict[str, Any] = {}
    for name, raw in sorted(env.items()):
        if not name.startswith(KAFKA_PREFIX) or name == BOOTSTRAP_SERVERS_ENV:
            continue
        setting = name[len(KAFKA_PREFIX):].lower()
        if setting not in known:
            close = difflib.get_close_matches(setting, list(known), n=1)
            hint = f"; did you mean {KAFKA_PREFIX}{close[0].upper()}?" if close else ""
            raise ConfigError(name, f"is not a kafka-python client setting{hint}")
        value = _convert(name, raw, known[setting], setting)
        if is_secret(setting):
            register_secret(value)
        config[setting] = value
    return config


def kafka_settings() -> dict[str, Any]:
    """Every kafka-python client setting, with its default (producer, consumer, admin)."""
    # Imported here: `import outbox` to call `publish` must not load kafka-python.
    from kafka import KafkaConsumer, KafkaProducer
    from kafka.admin import KafkaAdminClient

    return {**KafkaAdminClient.DEFAULT_CONFIG, **KafkaConsumer.DEFAULT_CONFIG,
            **KafkaProducer.DEFAULT_CONFIG}


# Settings whose default is None but whose value is not text.
_INT_SETTINGS = frozenset({"receive_buffer_bytes", "send_buffer_bytes"})


def _convert(name: str, raw: str, default: Any, setting: str) -> Any:
    if setting == "acks":  # 0, 1 or all (-1)
        return raw if raw == "all" else _to_int(name, raw)
    if setting == "api_version":  # "3.6" or "3.6.0" -> (3, 6, 0)
        try:
            return tuple(int(part) for part in raw.split("."))
        except ValueError:
            raise ConfigError(name, "is not a version like 3.6.0") from None
    if isinstance(default, bool):
        return parse_bool(name, raw)
    if isinstance(default, int) or setting in _INT_SETTINGS:
        return _to_int(name, raw)
    if isinstance(default, float):  # retries (inf), consumer_timeout_ms
        number = _to_float(name, raw)
        return int(number) if number.is_integer() else number
    if isinstance(default, str):
        return raw
    if default is None and not (setting.endswith(("serializer", "deserializer", "_provider"))
                                or setting == "ssl_context"):
        return raw
    raise ConfigError(
        name, "takes a Python object, not text; pass it in code (Consumer(..., **kafka_config))"
    )


def _to_int(name: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(name, f"{_shown(name, raw)} is not an integer") from None


def _to_float(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(name, f"{_shown(name, raw)} is not a number") from None
    if value != value:  # NaN
        raise ConfigError(name, "NaN is not a number")
    return value


def _shown(name: str, raw: str) -> str:
    """A value for an error line: quoted, unless its setting is a secret."""
    return "the value" if is_secret(name) else repr(raw)


def parse_bool(name: str, raw: str) -> bool:
    """One list of words for every boolean setting of the kit; anything else is refused."""
    word = raw.strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise ConfigError(
        name, f"{_shown(name, raw)} is not a boolean; use one of {', '.join(BOOL_WORDS)}"
    )


def is_secret(setting: str) -> bool:
    lowered = setting.lower()
    return any(word in lowered for word in _SECRET_WORDS)


# Values of every secret setting read so far (Kafka passwords, database
# passwords), so that a config dump masks them whatever name they sit under.
_SECRET_VALUES: set[str] = set()


def register_secret(value: object) -> None:
    if isinstance(value, str) and value:
        _SECRET_VALUES.add(value)


def safe_kafka_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a Kafka config fit for a log line: secrets become ***, by name and by value."""
    return {
        k: ("***" if is_secret(k) or (isinstance(v, str) and v in _SECRET_VALUES) else v)
        for k, v in config.items()
    }


def env_bool(name: str, default: bool, env: Mapping[str, str] | None = None) -> bool:
    """One boolean variable, read as `settings_from_env` reads a field; unset or empty: `default`."""
    value: bool = _env_setting(name, default, bool, env)
    return value


def env_int(
    name: str, default: int, env: Mapping[str, str] | None = None, *, minimum: int = 0
) -> int:
    """One integer variable (see `env_bool`), refused below `minimum`."""
    value: int = _env_setting(name, default, int, env)
    if value < minimum:
        raise ConfigError(name, f"{value} is below the minimum of {minimum}")
    return value


def env_float(
    name: str, default: float, env: Mapping[str, str] | None = None, *, minimum: float = 0.0
) -> float:
    """One finite number variable (see `env_bool`), refused below `minimum`."""
    value: float = _env_setting(name, default, float, env)
    if value < minimum:
        raise ConfigError(name, f"{value} is below the minimum of {minimum}")
    return value


def _env_setting(name: str, default: Any, kind: type, env: Mapping[str, str] | None) -> Any:
    raw = (os.environ if env is None else env).get(name)
    return default if raw is None or raw == "" else parse_setting(name, raw, kind)


def settings_from_env(
    cls: type[_Settings], prefix: str, env: Mapping[str, str] | None = None, **given: Any
) -> _Settings:
    """A settings dataclass from `<prefix><FIELD>` variables; keyword arguments that are not None win.

    The one reader of `OUTBOX_*` settings: each variable's text is parsed by
    its field's type (`bool` by `BOOL_WORDS`, `int`, `float` (finite), `str`
    as it is); a field whose metadata has `"env": NAME` reads that variable
    instead, `"env": None` never reads one. Range checks stay in the
    dataclass's `__post_init__`; an error there about a field that came from
    a variable is re-raised naming the variable, e.g.
    `OUTBOX_CONSUMER_MAX_ATTEMPTS: must be between 1 and 100, got 0`.
    """
    env = os.environ if env is None else env
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    variables: dict[str, str] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]  # cls is a dataclass
        if given.get(f.name) is not None:
            values[f.name] = given[f.name]
            continue
        name = f.metadata.get("env", prefix + f.name.upper())
        raw = env.get(name) if name is not None else None
        if raw is None or raw == "":
            continue
        values[f.name] = parse_setting(name, raw, hints[f.name])
        variables[f.name] = name
    try:
        return cls(**values)
    except ConfigError as exc:
        for name in (exc.field, *exc.related):
            if name in variables:
                raise exc.named(variables[name]) from None
        raise


def parse_setting(name: str, raw: str, kind: object) -> Any:
    """The text of variable `name` as a value of type `kind` (bool, int, float or str)."""
    if kind is bool:
        return parse_bool(name, raw)
    if kind is int:
        return _to_int(name, raw)
    if kind is float:
        value = _to_float(name, raw)
        if not math.isfinite(value):
            raise ConfigError(name, f"{raw!r} is not a finite number")
        return value
    if kind is str:
        return raw
    raise TypeError(f"{name}: no reader for settings of type {kind!r}")
