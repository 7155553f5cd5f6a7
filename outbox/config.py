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

import os
from collections.abc import Mapping
from typing import Any

from sqlalchemy.engine import make_url

from outbox.errors import ConfigError

DATABASE_URL_ENV = "OUTBOX_DATABASE_URL"
BOOTSTRAP_SERVERS_ENV = "OUTBOX_KAFKA_BOOTSTRAP_SERVERS"
KAFKA_PREFIX = "OUTBOX_KAFKA_"

_SECRET_WORDS = ("password", "secret", "token", "key")  # "ssl_keyfile" paths are harmless but masked too
_BOOL_WORDS = {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False}


def database_url(url: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """The database URL from the argument or `OUTBOX_DATABASE_URL`.

    A plain `postgresql://` URL is upgraded to the psycopg 3 driver, which is
    the only driver the kit is tested with.
    """
    env = os.environ if env is None else env
    value = url or env.get(DATABASE_URL_ENV)
    if not value:
        raise ConfigError(
            DATABASE_URL_ENV,
            "not set; pass a SQLAlchemy URL such as postgresql+psycopg://user:password@host:5432/db",
        )
    try:
        parsed = make_url(value)
    except Exception:
        raise ConfigError(
            DATABASE_URL_ENV, "is not a valid SQLAlchemy URL (expected postgresql+psycopg://...)"
        ) from None
    if parsed.get_backend_name() != "postgresql":
        raise ConfigError(
            DATABASE_URL_ENV, f"backend {parsed.get_backend_name()!r} is not supported; use PostgreSQL"
        )
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def safe_url(url: str) -> str:
    """The URL with its password replaced by ***, for logs and errors."""
    try:
        return make_url(url).render_as_string(hide_password=True)
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
    other variable with the prefix becomes a lower-case kafka-python setting.
    Integers and booleans are converted; everything else stays a string.
    """
    env = os.environ if env is None else env
    config: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith(KAFKA_PREFIX) or name == BOOTSTRAP_SERVERS_ENV:
            continue
        setting = name[len(KAFKA_PREFIX):].lower()
        config[setting] = _coerce(raw)
    return config


def _coerce(raw: str) -> Any:
    if raw.lower() in _BOOL_WORDS:
        return _BOOL_WORDS[raw.lower()]
    try:
        return int(raw)
    except ValueError:
        return raw


def is_secret(setting: str) -> bool:
    return any(word in setting.lower() for word in _SECRET_WORDS)


def safe_kafka_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a Kafka config fit for a log line: secrets become ***."""
    return {k: ("***" if is_secret(k) else v) for k, v in config.items()}


def env_int(
    name: str, default: int, env: Mapping[str, str] | None = None, *, minimum: int = 0
) -> int:
    env = os.environ if env is None else env
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(name, f"{raw!r} is not an integer") from None
    if value < minimum:
        raise ConfigError(name, f"{value} is below the minimum of {minimum}")
    return value


def env_float(
    name: str, default: float, env: Mapping[str, str] | None = None, *, minimum: float = 0.0
) -> float:
    env = os.environ if env is None else env
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(name, f"{raw!r} is not a number") from None
    if value < minimum:
        raise ConfigError(name, f"{value} is below the minimum of {minimum}")
    return value
