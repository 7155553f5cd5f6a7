"""Dead letters, their one home: parked by the consumer here, listed, replayed and discarded here.

    park(session, group, record, error=..., attempts=..., event_id=...)
                                                            the consumer parks a message (no commit)
    raw_event_id(headers)                                   a malformed message's ce_id, if any
    list_dead_letters(conn, group=None, limit=100)          look at what was parked
    replay_dead_letters(engine, group=..., handler=...)     apply them, after the fix
    discard_dead_letters(conn, group=..., ids=..., reason=...)  give up on some, audited
    import_handler("package.module:function")             the handler, for a CLI

A dead letter is the raw message as read (key, value and headers as bytes,
headers that are not UTF-8 or hold NUL stored hex-encoded), so that replay
decodes exactly what the consumer could not apply. Parking is idempotent
per (group, topic, partition, offset): a redelivered message is not parked
twice.

Replay applies the stored message directly, through the same `apply_event`
the consumer uses, instead of producing it to the topic again. In one
transaction per dead letter it decodes the stored key, value and headers,
inserts the inbox row, runs the handler and sets `replayed_at`; a rollback
leaves the dead letter parked as it was. Why not re-produce:

- only the group that failed sees the message again; every other group on
  the topic is untouched (a re-produced malformed message would be parked
  again by each of them);
- it works after the topic's retention deleted the original, and does not
  depend on the broker being up;
- applying and marking commit together, and the inbox makes a second replay
  of the same event (or a racing consumer) a skip, so replay is idempotent.

The price: the process that replays must have the handler (the same code the
consumer runs, after the fix). Replaying does not restore order: later events
of the same key were applied while this one was parked.

Inbox retention and `purge_inbox` live in `outbox.inbox` (re-exported here
for code written before they moved).
"""

from __future__ import annotations

import importlib
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, exists, func, literal, select, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import ReturningInsert
from sqlalchemy.types import LargeBinary

from outbox.envelope import bytes_from_text_or_hex, decode, headers_as_json
from outbox.errors import ConfigError, KitStatementError, ParkedEventError, describe_error
from outbox.handler import Handler, TransactionEndedError, check_handler
from outbox.inbox import apply_event, purge_inbox, unclaim_events
from outbox.preflight import kit_statement
from outbox.records import KafkaRecord
from outbox.schema import outbox_dead_letter

__all__ = [
    "DeadLetter",
    "ReplayResult",
    "discard_dead_letters",
    "import_handler",
    "list_dead_letters",
    "park",
    "purge_inbox",  # its home is outbox.inbox; kept importable from here
    "raw_event_id",
    "replay_dead_letters",
]

log = logging.getLogger(__name__)



@dataclass(frozen=True, kw_only=True, slots=True)
class DeadLetter:
    """One row of `outbox_dead_letter`: the raw message as read, and why it was parked."""

    id: int
    consumer_group: str
    topic: str
    partition: int
    offset: int
    event_id: uuid.UUID | None
    key: bytes | None
    value: bytes | None
    headers: dict[str, str]
    error: str
    attempts: int
    parked_at: datetime
    replayed_at: datetime | None


@dataclass(frozen=True, kw_only=True, slots=True)
class ReplayResult:
    """What `replay_dead_letters` did, by dead-letter id."""

    applied: list[int] = field(default_factory=list)  # handler ran, effect committed
    duplicates: list[int] = field(default_factory=list)  # group already had the event; marked
    failed: dict[int, str] = field(default_factory=dict)  # still failing: left parked, error kept
    skipped: list[int] = field(default_factory=list)  # replayed before (or by a concurrent replay)


def park(
    session: Session, group: str, record: KafkaRecord, *, error: str, attempts: int,
    event_id: uuid.UUID | None,
) -> bool:
    """Add `record`, raw, to `group`'s dead letters in `session`'s transaction; no commit.

    Returns False when this group had parked this very message already (a
    redelivery): nothing is inserted then. `error` is stored as given
    (`describe_error` keeps it to one line, secrets masked).
    """
    insert = _dead_letter_insert(
        group=group, topic=record.topic, partition=record.partition, offset=record.offset,
        event_id=event_id, key=record.key, value=record.value,
        headers=headers_as_json(record.headers), error=error, attempts=attempts,
    )
    with kit_statement(f"parking a message in {outbox_dead_letter.name}"):
        # RETURNING, not rowcount: psycopg reports -1 for an INSERT ... SELECT.
        return session.execute(insert).first() is not None


def raw_event_id(headers: Sequence[tuple[str, bytes]] | None) -> uuid.UUID | None:
    """The `ce_id` header of a message that did not decode, if it holds a UUID."""
    for name, value in headers or ():
        if name == "ce_id":
            try:
                return uuid.UUID(value.decode())
            except (ValueError, UnicodeDecodeError, AttributeError):
                return None
    return None


def _dead_letter_insert(
    *, group: str, topic: str, partition: int, offset: int, event_id: uuid.UUID | None,
    key: bytes | None, value: bytes | None, headers: dict[str, str], error: str, attempts: int,
) -> ReturningInsert[tuple[int]]:
    """INSERT the message unless this group parked this very message already (a redelivery).

    RETURNING the new row's id: no row back means it was parked before.
    """
    t = outbox_dead_letter
    row = select(
        literal(group).label("consumer_group"),
        literal(topic).label("topic"),
        literal(partition).label("partition"),
        literal(offset).label("offset"),
        literal(event_id, t.c.event_id.type).label("event_id"),
        literal(key, LargeBinary()).label("key"),
        literal(value, LargeBinary()).label("value"),
        literal(headers, JSONB()).label("headers"),
        literal(error).label("error"),
        literal(attempts).label("attempts"),
    ).where(
        ~exists().where(
            t.c.consumer_group == group,
            t.c.topic == topic,
            t.c.partition == partition,
            t.c.offset == offset,
        )
    )
    return t.insert().from_select(
        ["consumer_group", "topic", "partition", "offset", "event_id", "key", "value",
         "headers", "error", "attempts"],
        row,
    ).returning(t.c.id)


def list_dead_letters(
    conn: Connection, group: str | None = None, *, limit: int = 100, include_replayed: bool = False
) -> list[DeadLetter]:
    """Dead letters, oldest first; by default only those not replayed yet."""
    t = outbox_dead_letter
    query = select(t).order_by(t.c.id).limit(limit)
    if group is not None:
        query = query.where(t.c.consumer_group == group)
    if not include_replayed:
        query = query.where(t.c.replayed_at.is_(None))
    return [_dead_letter(row._mapping) for row in conn.execute(query)]


def replay_dead_letters(
    engine: Engine,
    *,
    group: str,
    handler: Handler,
    ids: Sequence[int] | None = None,
    limit: int = 1000,
) -> ReplayResult:
    """Apply `group`'s parked messages through `handler`, once each, oldest first.

    One transaction per dead letter: inbox row, handler effects and
    `replayed_at` commit together. A dead letter whose handler still fails
    (or that still does not decode) stays parked with the new error and one
    more attempt counted; the others go on. `ids` restricts the replay; an id
    that is not a dead letter of `group` raises `ParkedEventError` before
    anything is replayed. Safe to run twice and next to a running consumer.

    The handler is held to the same contract as in the consumer
    (`outbox.handler`): one that commits, rolls back or closes the session
    fails, and its dead letter stays parked. A handler that cannot be one
    (not callable, async, wrong signature) raises `ConfigError` first, and
    missing or older tables raise `SchemaError`, stopping the replay.
    """
    check_handler(handler)
    t = outbox_dead_letter
    with engine.connect() as conn:
        if ids is not None:
            found = set(
                conn.execute(
                    select(t.c.id).where(t.c.consumer_group == group, t.c.id.in_(list(ids)))
                ).scalars()
            )
            missing = sorted(set(ids) - found)
            if missing:
                raise ParkedEventError(
                    f"no dead letter with id {', '.join(map(str, missing))} for group {group!r}"
                )
            candidates = sorted(found)
        else:
            candidates = list(
                conn.execute(
                    select(t.c.id)
                    .where(t.c.consumer_group == group, t.c.replayed_at.is_(None))
                    .order_by(t.c.id)
                    .limit(limit)
                ).scalars()
            )
    result = ReplayResult()
    for dead_letter_id in candidates:
        try:
            outcome = _replay_one(engine, dead_letter_id, group, handler)
        except KitStatementError:
            raise
        except Exception as exc:
            error = describe_error(exc)
            with engine.begin() as conn:
                conn.execute(
                    update(t)
                    .where(t.c.id == dead_letter_id)
                    .values(error=error, attempts=t.c.attempts + 1)
                )
            result.failed[dead_letter_id] = error
            log.warning("dead letter %s still fails: group=%s error=%s", dead_letter_id, group,
                        error)
            continue
        {"applied": result.applied, "duplicates": result.duplicates,
         "skipped": result.skipped}[outcome].append(dead_letter_id)
        log.info("dead letter %s replayed: group=%s outcome=%s", dead_letter_id, group, outcome)
    return result


def import_handler(spec: str) -> Handler:
    """The handler named `package.module:function` (what a CLI's --handler gets)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigError("handler", f"{spec!r} is not 'package.module:function'")
    try:
        target: Any = importlib.import_module(module_name)
        for name in attribute.split("."):
            target = getattr(target, name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError("handler", f"cannot import {spec!r}: {exc}") from None
    if not callable(target):
        raise ConfigError("handler", f"{spec!r} is not callable")
    handler: Handler = target
    return handler


def _replay_one(engine: Engine, dead_letter_id: int, group: str, handler: Handler) -> str:
    t = outbox_dead_letter
    with Session(engine) as session, session.begin():
        # SKIP LOCKED: a concurrent replay of the same row is already doing it.
        row = session.execute(
            select(t)
            .where(t.c.id == dead_letter_id, t.c.replayed_at.is_(None))
            .with_for_update(skip_locked=True)
        ).first()
        if row is None:
            return "skipped"
        letter = _dead_letter(row._mapping)
        event = decode(
            topic=letter.topic, partition=letter.partition, offset=letter.offset,
            key=letter.key, value=letter.value,
            headers=[(name, bytes_from_text_or_hex(v)) for name, v in letter.headers.items()],
        )
        try:
            applied = apply_event(session, group=group, event=event, handler=handler)
        except TransactionEndedError:
            # The handler ended the transaction below SQLAlchemy, maybe with a
            # COMMIT of the inbox row: delete it, so the next replay applies it.
            with Session(engine) as repair, repair.begin():
                unclaim_events(repair, group, [event.id])
            raise
        session.execute(update(t).where(t.c.id == dead_letter_id).values(replayed_at=func.now()))
    return "applied" if applied else "duplicates"


def _dead_letter(row: Any) -> DeadLetter:
    return DeadLetter(**{name: row[name] for name in DeadLetter.__dataclass_fields__})


def discard_dead_letters(
    conn: Connection, *, group: str, ids: Sequence[int], reason: str, actor: str | None = None
) -> list[int]:
    """Give up on dead letters of `group` that can never be applied; returns their ids.

    For a message no fixed handler will ever accept (garbage, an event of a
    retired type). Nothing is deleted: each row keeps its key, value and
    headers, gets `replayed_at` set (so replay and `list_dead_letters` pass
    it by) and its error prefixed with `discarded by <actor>: <reason>`, and
    one WARNING line per row is logged, as the audit trail. `actor` defaults
    to the operating-system user and the database role.

    Runs in the caller's transaction; nothing is discarded unless it commits.
    Raises `ParkedEventError`, before changing anything, if an id is not a
    dead letter of `group` still waiting to be replayed; `ConfigError` if no
    id or no reason is given.
    """
    import getpass

    from outbox.errors import mask_secrets

    if not ids:
        raise ConfigError("ids", "name the dead letters to discard; there is no 'all'")
    if not reason.strip():
        raise ConfigError("reason", "say why the dead letters are discarded (it is kept with them)")
    reason = mask_secrets(" ".join(reason.split()))
    t = outbox_dead_letter
    wanted = sorted(set(ids))
    found = set(
        conn.execute(
            select(t.c.id)
            .where(t.c.consumer_group == group, t.c.id.in_(wanted), t.c.replayed_at.is_(None))
            .with_for_update()
        ).scalars()
    )
    missing = [i for i in wanted if i not in found]
    if missing:
        raise ParkedEventError(
            f"no dead letter waiting with id {', '.join(map(str, missing))} for group {group!r}; "
            "see `outbox dead-letters list`"
        )
    if actor is None:
        try:
            os_user = getpass.getuser()
        except Exception:  # no login name in some containers
            os_user = "unknown"
        role = conn.execute(select(func.current_user())).scalar_one()
        actor = f"{os_user} (database role {role})"
    note = f"discarded by {actor}: {reason}; was: "
    conn.execute(
        update(t).where(t.c.id.in_(wanted)).values(replayed_at=func.now(), error=note + t.c.error)
    )
    for dead_letter_id in wanted:
        log.warning("dead letter %s discarded: group=%s by=%s reason=%s", dead_letter_id, group,
                    actor, reason)
    return wanted
