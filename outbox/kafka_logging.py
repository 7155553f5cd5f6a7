"""Keep kafka-python's DEBUG logging free of credentials and payloads.

With DEBUG logging on, kafka-python logs every request and response it
exchanges with a broker, as objects and as raw wire bytes: the SASL
authentication request among them, whose bytes hold the password in clear
(PLAIN) or the client's proof (SCRAM), and every produce and fetch, whose
bytes hold the messages. `protect_kafka_logs()` attaches one
`logging.Filter` to the kafka-python loggers that do that. It configures no
handler and changes no level: the records still go wherever the
application sends them, with the sensitive part replaced:

    kafka.net.connection   'Request %d: %s', 'Response %d (%s ms): %s'    SASL, Produce and Fetch
    kafka.protocol.parser  'Sending request %d %s', 'Received response'    messages shown as their
                                                                           class name only
    kafka.protocol.parser  'Send: %r', 'Recv: %r'                          raw bytes shown as their size
    kafka.producer.kafka   'Sending (key=%r value=%r headers=%r)'          key, value, headers dropped
    kafka.admin.client     'Starting KafkaAdminClient with configuration'  secret settings masked

Idempotent and cheap: a filter only runs for records that pass the logger's
level, so with DEBUG off it costs nothing. The consumer calls it when it is
built; a daemon calls it once at start. (kafka-python 2.x used `kafka.conn`
for what 3.x logs from `kafka.net.connection`; both are covered.)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from outbox.config import safe_kafka_config

__all__ = ["KAFKA_WIRE_LOGGERS", "protect_kafka_logs"]

KAFKA_WIRE_LOGGERS = (
    "kafka.net.connection",
    "kafka.conn",
    "kafka.protocol.parser",
    "kafka.producer.kafka",
    "kafka.admin.client",
)

# Request and response classes whose contents are credentials or messages
# (SaslAuthenticateRequest, SaslBytesRequest, ProduceRequest, FetchResponse, ...).
_SENSITIVE_CLASS_PREFIXES = ("Sasl", "Produce", "Fetch")


class _RedactKafkaWire(logging.Filter):
    """Rewrites the arguments of kafka-python's wire-level records; never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if not args:
            return True
        message = str(record.msg)
        if isinstance(args, Mapping):  # logging unpacks a lone mapping argument: the config dump
            record.args = safe_kafka_config(args)
        elif message.endswith(("Send: %r", "Recv: %r")):
            record.args = tuple(_size(a) if isinstance(a, bytes | bytearray | memoryview) else a
                                for a in args)
        elif "Sending (key=" in message:
            record.msg = "%s: Sending a record (key, value and headers not logged) to %s"
            record.args = (args[0], args[-1])
        else:
            record.args = tuple(_redacted(a) for a in args)
        return True


def _size(data: bytes | bytearray | memoryview) -> str:
    return f"<{len(data)} bytes, not logged>"


def _redacted(value: Any) -> Any:
    name = type(value).__name__
    if name.startswith(_SENSITIVE_CLASS_PREFIXES):
        return f"<{name}, contents not logged>"
    return value


_FILTER = _RedactKafkaWire()


def protect_kafka_logs() -> None:
    """Attach the redacting filter to kafka-python's wire-level loggers (once; idempotent)."""
    for name in KAFKA_WIRE_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
