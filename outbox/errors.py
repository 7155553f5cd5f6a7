"""Every exception the kit raises on purpose.

    OutboxError                     root; catch this to catch everything below
    ├── ConfigError                 a setting is missing or out of range (names the field)
    ├── InvalidEventError           publish() refused an event before anything was written
    │   └── PayloadTooLargeError    the encoded data is over the configured limit
    ├── PublishError                the broker did not acknowledge an event (carries event id, topic)
    ├── SchemaError                 the database schema is missing or disagrees with the kit
    │   └── KitStatementError       one of the kit's own statements found its table unusable
    ├── MalformedMessageError       a Kafka message is not a CloudEvent the kit can read
    ├── ParkedEventError            a parked event or dead letter was not found / not replayable
    └── HandlerContractError        a consumer's handler did what `outbox.handler` forbids
        └── TransactionEndedError   ...or its transaction ended below the guard (maybe committed)

`HandlerContractError` and `TransactionEndedError` reach user code that calls
`apply_event` itself (roll back; after the second, `unclaim_events`); the
consumer and replay turn them into retries and dead letters.

Messages name what was wrong and what to do. They never contain secrets: a
database URL is always rendered with its password masked (see `config.safe_url`).
"""

from __future__ import annotations

import re
import uuid


class OutboxError(Exception):
    """Root of the kit's exception tree."""


class ConfigError(OutboxError, ValueError):
    """A configuration value is missing, malformed or unsafe."""

    def __init__(self, field: str, message: str, *, related: tuple[str, ...] = ()) -> None:
        self.field = field
        self.reason = message
        # Other fields a check of several values is about: whichever of them the
        # user set is the one to name (outbox.config.settings_from_env).
        self.related = related
        super().__init__(f"{field}: {message}")

    def named(self, field: str) -> ConfigError:
        """The same error, naming `field` (the variable or option the value came from)."""
        return ConfigError(field, self.reason)


class InvalidEventError(OutboxError, ValueError):
    """`publish()` refused the event; nothing was added to the transaction."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"invalid event {field}: {message}")


class PayloadTooLargeError(InvalidEventError):
    """The encoded event is larger than `max_payload_bytes`."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(
            "data",
            f"encoded size {size} bytes is over the limit of {limit} bytes; "
            "store the document elsewhere and publish a reference to it, or raise "
            "OUTBOX_MAX_PAYLOAD_BYTES (and the broker's message.max.bytes) together",
        )


class PublishError(OutboxError):
    """The broker refused or did not acknowledge an event."""

    def __init__(
        self, message: str, *, event_id: uuid.UUID | None = None, topic: str | None = None,
        retriable: bool = True,
    ) -> None:
        self.event_id = event_id
        self.topic = topic
        self.retriable = retriable
        super().__init__(message)


class SchemaError(OutboxError):
    """The outbox tables are missing or do not match the kit's migrations."""


class MalformedMessageError(OutboxError, ValueError):
    """A consumed message is not a binary-mode CloudEvent with an id, type and readable data."""


class ParkedEventError(OutboxError, LookupError):
    """A parked event or dead letter could not be found or replayed."""


class KitStatementError(SchemaError):
    """One of the kit's own statements found its table missing, older or not usable: never a
    message's fault, so the consumer raises it instead of retrying or dead-lettering."""


class HandlerContractError(OutboxError):
    """A handler did what the handler contract forbids (see `outbox.handler`)."""


class TransactionEndedError(HandlerContractError):
    """The transaction ended under the handler by a way the guard could not refuse.

    It may have been a COMMIT: then the batch's inbox rows, and whatever the
    handler wrote before it, are durable. The consumer deletes the inbox rows
    of the events whose handlers did not complete, so none is skipped as a
    duplicate, and dead-letters this event at once if its row had been
    committed (its partial effects then need a person).
    """


def describe_error(exc: BaseException, *, limit: int = 500) -> str:
    """`Type: first line of the message`, short, for logs, error lines and stored errors.

    Only the first line: database errors put the SQL, its parameters and the
    offending row on later lines, and those can hold payment data. Passwords
    in URLs or `password=` pairs are masked in what is left.
    """
    name = f"{type(exc).__module__}.{type(exc).__qualname__}".removeprefix("builtins.")
    text = f"{name}: {first_line(exc)}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def first_line(exc: BaseException | None) -> str:
    """The first line of an exception's message, secrets masked (see `describe_error`)."""
    text = str(exc) if exc is not None else ""
    if exc is not None and not text.strip() and exc.args:
        # Some clients (pika's AMQPConnectionError) print as nothing and keep the
        # reason in their arguments: "ConnectionRefusedError(111, ...)" says what is wrong.
        text = ", ".join(str(arg).strip() or repr(arg) for arg in exc.args)
    lines = text.replace("\x00", "\\x00").strip().splitlines()
    return mask_secrets(lines[0] if lines else "")


def mask_secrets(text: str) -> str:
    """`text` with URL passwords and `password=...` pairs replaced by ***."""
    return _SECRET_PAIR.sub(r"\1=***", _SECRET_URL.sub(r"\1***@", text))


_SECRET_URL = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")
_SECRET_PAIR = re.compile(r"(?i)\b(password|passwd|pwd|secret|token)\s*=\s*[^\s&]+")


# libpq's words for a login the server (or the client's TLS settings) refused.
# Connection errors carry no SQLSTATE in psycopg, so the text is what there is.
_REFUSED_LOGIN = re.compile(
    r"authentication failed|no pg_hba\.conf entry|pg_hba\.conf rejects|does not exist|not permitted to log in"
    r"|permission denied for database|no password supplied|password is missing"
    r"|server does not support SSL|SSL error:|certificate|sslmode"
    r"|invalid connection option|invalid dsn|invalid URI",
    re.IGNORECASE,
)


def login_refused(exc: BaseException) -> str | None:
    """The server's reason when `exc` (or what caused it) is a refused database
    login, which no waiting fixes, else None (the database is merely down).

    The one place the relay and the consumer tell "wrong" from "down".
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        message = first_line(getattr(current, "orig", None) or current)
        if _REFUSED_LOGIN.search(message):
            return message.rsplit("failed: ", 1)[-1].replace("FATAL:  ", "").strip()
        current = current.__cause__ or current.__context__
    return None
