"""What the relay and the consumer share on RabbitMQ: the URL, the login check, the message format.

    rabbitmq_url(url=None, env=None)   OUTBOX_RABBITMQ_URL, checked, its password a registered secret
    connection_parameters(url)         pika's parameters for it (heartbeat, timeouts: the kit's defaults)
    refusal(exc)                       a ConfigError if the broker refused the login or vhost, else None
    to_amqp(headers) / from_amqp(...)  the kit's CloudEvents headers <-> AMQP properties

On the wire (CloudEvents 1.0, AMQP protocol binding, binary content mode):
the body is the event data as written; the `content-type` property is the
CloudEvents `datacontenttype`; every other attribute is an application
property (an AMQP 0-9-1 header) named with the binding's `cloudEvents:`
prefix: `cloudEvents:specversion`, `cloudEvents:id`, `cloudEvents:source`,
`cloudEvents:type`, `cloudEvents:time` (canonical string form); your own
headers follow as they are. The relay adds `message_id` (the event id),
`delivery_mode` 2 (persistent), the event key as `cloudEvents:partitionkey`
(the CloudEvents partitioning extension) and the key's routing bucket as
the routing key (`outbox.rabbitmq_topology`).

`from_amqp` maps a delivered message back to the header list the Kafka
side uses (`ce_id`, `content-type`, ...), so `outbox.envelope.decode`, the
dead letters and replay are the same code for both transports.

pika is imported only by `connection_parameters`: `import outbox` and the
Kafka-only install never need it. No secret leaves this module: URLs are
shown through `safe_url`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from outbox.config import register_secret, safe_url
from outbox.errors import ConfigError

RABBITMQ_URL_ENV = "OUTBOX_RABBITMQ_URL"
CE_PREFIX = "cloudEvents:"
KAFKA_PREFIX = "ce_"
CONTENT_TYPE = "content-type"

# Unless the URL says otherwise. A long heartbeat because a blocking client
# only answers heartbeats between polls, and one batch may take a while.
DEFAULT_QUERY = {"heartbeat": "300", "connection_attempts": "1", "socket_timeout": "10",
                 "blocked_connection_timeout": "30"}


def rabbitmq_url(url: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """The broker URL from the argument or `OUTBOX_RABBITMQ_URL`; amqp:// or amqps:// only."""
    env = os.environ if env is None else env
    value = url or env.get(RABBITMQ_URL_ENV)
    if not value:
        raise ConfigError(
            RABBITMQ_URL_ENV, "not set; pass amqp://USER:PASSWORD@HOST:5672/VHOST (amqps:// for TLS)"
        )
    parts = urlsplit(value)
    if parts.scheme not in ("amqp", "amqps"):
        raise ConfigError(RABBITMQ_URL_ENV, f"scheme {parts.scheme!r} is not amqp:// or amqps://")
    if parts.password:
        register_secret(parts.password)
    try:
        _ = parts.port
    except ValueError:
        raise ConfigError(RABBITMQ_URL_ENV, "has a port that is not a number") from None
    if not parts.hostname:
        raise ConfigError(RABBITMQ_URL_ENV, "has no host")
    return value


def connection_parameters(url: str) -> Any:
    """pika.URLParameters for `url`, with the kit's defaults for what the URL leaves out."""
    import pika  # lazily: only RabbitMQ users install it

    parts = urlsplit(url)
    given = {item.partition("=")[0] for item in parts.query.split("&") if item}
    extra = "&".join(f"{k}={v}" for k, v in DEFAULT_QUERY.items() if k not in given)
    query = "&".join(q for q in (parts.query, extra) if q)
    try:
        return pika.URLParameters(parts._replace(query=query).geturl())
    except Exception as exc:  # pika's message may quote the URL
        raise ConfigError(RABBITMQ_URL_ENV, f"pika refused {safe_url(url)}: {type(exc).__name__}") from None


def refusal(exc: BaseException, url: str) -> ConfigError | None:
    """A ConfigError naming what to fix when the broker refused the login or the vhost, else None.

    Any other connection error (refused TCP, timeout, the broker starting) is
    an outage: the caller waits it out.
    """
    import pika.exceptions as pe

    where = safe_url(url)
    if isinstance(exc, (pe.ProbableAuthenticationError, pe.AuthenticationError)):
        return ConfigError(RABBITMQ_URL_ENV, (
            f"the broker at {where} refused the login (ACCESS_REFUSED); "
            "check the user and password in OUTBOX_RABBITMQ_URL"))
    if isinstance(exc, pe.ProbableAccessDeniedError) or (
        isinstance(exc, pe.ConnectionClosedByBroker) and exc.reply_code in (403, 530)
    ):
        return ConfigError(RABBITMQ_URL_ENV, (
            f"the broker at {where} refused the virtual host (NOT_ALLOWED); check that the vhost "
            "in OUTBOX_RABBITMQ_URL exists and that the user has permissions on it"))
    if isinstance(exc, pe.IncompatibleProtocolError):
        return ConfigError(RABBITMQ_URL_ENV, (
            f"{where} did not answer as an AMQP 0-9-1 broker (a TLS port with amqp://, "
            "or another service on that port?)"))
    return None


def to_amqp(headers: Sequence[tuple[str, bytes]]) -> tuple[str | None, dict[str, str]]:
    """The kit's CloudEvents headers as the AMQP binding maps them: (content type, headers)."""
    content_type: str | None = None
    amqp: dict[str, str] = {}
    for name, raw in headers:
        value = raw.decode()
        if name == CONTENT_TYPE:
            content_type = value
        elif name.startswith(KAFKA_PREFIX):
            amqp[CE_PREFIX + name[len(KAFKA_PREFIX):]] = value
        else:
            amqp[name] = value
    return content_type, amqp


def from_amqp(content_type: str | None, headers: Mapping[str, Any] | None) -> list[tuple[str, bytes]]:
    """A delivered message's properties as the kit's header list (the reverse of `to_amqp`).

    A header value that is not text (another producer's numbers, tables) is
    passed on as its text form; `decode` decides whether the event is whole.
    """
    result: list[tuple[str, bytes]] = []
    for name, value in (headers or {}).items():
        raw = value if isinstance(value, bytes) else str(value).encode()
        if name.startswith(CE_PREFIX):
            result.append((KAFKA_PREFIX + name[len(CE_PREFIX):], raw))
        else:
            result.append((name, raw))
    if content_type is not None:
        result.append((CONTENT_TYPE, content_type.encode()))
    return result
