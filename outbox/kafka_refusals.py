"""What a Kafka broker refuses, told apart from a broker that is down, in one line each.

Shared by the relay's publishers (`relay/kafka.py`, `relay/confluent.py`) and
the consumer (`outbox/offsets.py`): a refused SASL login, a TLS handshake that
fails, and an ACL that does not allow a topic or group are settings, which no
waiting fixes, so each becomes one `ConfigError` naming the `OUTBOX_KAFKA_*`
variable to check. Every text from a client passes through `scrub` first:
no secret leaves here.

kafka-python reports a refused login or handshake only as a log line on the
way to "Unable to bootstrap"; `connection_failures` listens for those lines.
Over TLS, kafka-python 3.0 also drops the broker's SaslAuthenticate error
response when the broker closes the connection right after it (it does after
a failed SCRAM login): all that is left is a connection lost after the
ApiVersions exchange, during SASL authentication. Seen on every attempt of a
bootstrap, that is the broker refusing the credentials (`LostDuringSasl`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from kafka import errors as kafka_errors

from outbox.config import is_secret
from outbox.errors import ConfigError, mask_secrets

SASL_SETTINGS = ("OUTBOX_KAFKA_SECURITY_PROTOCOL, OUTBOX_KAFKA_SASL_MECHANISM, "
                 "OUTBOX_KAFKA_SASL_PLAIN_USERNAME, OUTBOX_KAFKA_SASL_PLAIN_PASSWORD")
SSL_SETTINGS = "OUTBOX_KAFKA_SECURITY_PROTOCOL, OUTBOX_KAFKA_SSL_CAFILE, OUTBOX_KAFKA_SSL_*"


def refused_login(detail: str) -> ConfigError:
    return ConfigError(
        "OUTBOX_KAFKA_SASL_PLAIN_PASSWORD",
        f"the broker refused the SASL login ({detail}); check {SASL_SETTINGS}",
    )


def refused_tls(detail: str) -> ConfigError:
    return ConfigError(
        "OUTBOX_KAFKA_SSL_CAFILE", f"the TLS handshake with the broker failed ({detail}); check {SSL_SETTINGS}"
    )


def not_authorized(what: str, names: Iterable[str], operation: str, username: object) -> ConfigError:
    """The broker's ACLs do not allow this client's user `operation` on `what` (topic, group)."""
    who = f"user {username!r}" if username else "this client's user"
    listed = ", ".join(sorted(names))
    return ConfigError(
        "OUTBOX_KAFKA_SASL_PLAIN_USERNAME",
        f"the broker's ACLs do not allow {who} to {operation} {what} {listed}; "
        f"grant it (kafka-acls --add --allow-principal User:... --operation {operation.upper()} "
        f"--{what} ...) or connect as a user that has it",
    )


def refused_names(exc: BaseException, default: Iterable[str]) -> list[str]:
    """The topics or groups a kafka-python authorization error names (its first argument), else `default`."""
    named = exc.args[0] if exc.args and isinstance(exc.args[0], (set, list, tuple)) else default
    return sorted(map(str, named))


def scrub(text: str, config: Mapping[str, Any]) -> str:
    """A client's error text with the values of secret settings masked as well."""
    for name, value in config.items():
        if is_secret(name) and isinstance(value, str) and value:
            text = text.replace(value, "***")
    return mask_secrets(text)


class LostDuringSasl(Exception):
    """kafka-python lost a connection after ApiVersions, while authenticating (see the module doc)."""


_capture_lock = threading.Lock()


@contextmanager
def connection_failures() -> Iterator[list[BaseException]]:
    """The errors kafka-python logs (and then forgets) while it connects."""
    failures: list[BaseException] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            args = record.args if isinstance(record.args, tuple) else ()
            if record.name == "kafka.net.connection":
                if args and _lost_while_authenticating(args[0]):
                    failures.append(LostDuringSasl(str(args[-1])))
                return
            failures.extend(a for a in args if isinstance(a, BaseException))

    # A failed bootstrap connection is logged at WARNING, a later one at ERROR;
    # a connection lost is logged at ERROR by the connection itself.
    handler = Collect(logging.WARNING)
    loggers = [logging.getLogger("kafka.net.manager"), logging.getLogger("kafka.net.connection")]
    saved: list[tuple[logging.Logger, bool, int, bool]] = []
    with _capture_lock:
        for logger in loggers:
            quiet = not logger.isEnabledFor(logging.WARNING)
            saved.append((logger, quiet, logger.level, logger.propagate))
            if quiet:  # the daemon silences kafka-python; keep it silent, but listen
                logger.setLevel(logging.WARNING)
                logger.propagate = False
            logger.addHandler(handler)
    try:
        yield failures
    finally:
        with _capture_lock:
            for logger, quiet, level, propagate in saved:
                logger.removeHandler(handler)
                if quiet:
                    logger.setLevel(level)
                    logger.propagate = propagate


def _lost_while_authenticating(connection: object) -> bool:
    """A kafka-python 3 connection that failed after learning the broker's
    version (ApiVersions done) and before its init completed, with SASL on."""
    try:
        config = getattr(connection, "config", {})
        init = getattr(connection, "init_future", None)
        return bool(config.get("sasl_mechanism")) and str(config.get("security_protocol", "")).startswith(
            "SASL") and getattr(connection, "broker_version_data", None) is not None and (
            init is not None and init.is_done and init.failed())
    except Exception:  # a kafka-python whose internals differ: no guess
        return False


def raise_refusal(failures: Sequence[BaseException], config: Mapping[str, Any]) -> None:
    """Raise the one ConfigError for a refused login or handshake among `failures`, if any."""
    for exc in failures:
        detail = scrub(str(exc).rpartition(": ")[2] or type(exc).__name__, config)
        if isinstance(exc, (kafka_errors.SaslAuthenticationFailedError, kafka_errors.AuthorizationError)):
            raise refused_login(detail) from None
        if "Handshake failed" in str(exc) or "SSL" in type(exc).__name__:
            raise refused_tls(detail) from None
    if sum(isinstance(exc, LostDuringSasl) for exc in failures) >= 2:
        mechanism = config.get("sasl_mechanism")
        raise refused_login(
            f"the broker closed every connection during SASL {mechanism} authentication, "
            "as it does for a wrong username or password"
        ) from None
