"""What an operator does with the consuming side's tables: dead letters and inbox retention.

    list_dead_letters(conn, group=None, limit=100)          look at what was parked
    replay_dead_letters(engine, group=..., handler=...)     apply them, after the fix
    import_handler("package.module:function")             the handler, for a CLI
    purge_inbox(engine_or_conn, older_than=..., group=None) forget old inbox rows

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

Inbox retention: the inbox deduplicates only what it remembers. Keep rows
longer than the topic's `retention.ms` plus the longest time a message may
wait unconsumed (consumer lag, an outage, a paused group); a message read
again after its inbox row was purged would be applied twice. For example
with 7-day topic retention and at most 3 days of tolerated lag, purge with
`older_than=timedelta(days=10)` or more.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, delete, func, select, tuple_, update
from sqlalchemy.orm import Session

from outbox.consumer import Handler, apply_event, unclaim_events
from outbox.envelope import decode
from outbox.errors import ConfigError, ParkedEventError, describe_error
from outbox.handler import TransactionEndedError, check_handler
from outbox.preflight import KitStatementError
from outbox.schema import outbox_dead_letter, outbox_inbox

__all__ = [
    "DeadLetter",
    "ReplayResult",
    "import_handler",
    "list_dead_letters",
    "purge_inbox",
    "replay_dead_letters",
]

log = logging.getLogger(__name__)

_HEX = "hex:"  # how `envelope.headers_as_json` stores a header that is not UTF-8


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
            key=letter.key, value=letter.value, headers=_headers_from_json(letter.headers),
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


def purge_inbox(
    conn: Engine | Connection,
    *,
    older_than: timedelta,
    group: str | None = None,
    batch_size: int = 10_000,
    now: datetime | None = None,
) -> int:
    """Delete inbox rows processed more than `older_than` ago; returns how many.

    Read the retention rule in this module's docstring first: purging too
    early lets a redelivered message be applied twice.

    Deletes in batches of `batch_size`. Given an `Engine`, each batch is its
    own short transaction, so a large purge never holds locks for long. Given
    a `Connection`, the batches run inside the caller's transaction and
    nothing is committed here. `now` defaults to the database's clock.
    """
    if older_than <= timedelta(0):
        raise ConfigError("older_than", f"must be a positive duration, got {older_than}")
    if batch_size < 1:
        raise ConfigError("batch_size", f"must be 1 or more, got {batch_size}")
    if isinstance(conn, Engine):
        with conn.connect() as c:
            cutoff = _cutoff(c, now, older_than)
        total = 0
        while True:
            with conn.begin() as c:
                deleted = _delete_batch(c, cutoff, group, batch_size)
            total += deleted
            if deleted < batch_size:
                return total
    cutoff = _cutoff(conn, now, older_than)
    total = 0
    while True:
        deleted = _delete_batch(conn, cutoff, group, batch_size)
        total += deleted
        if deleted < batch_size:
            return total


def _cutoff(conn: Connection, now: datetime | None, older_than: timedelta) -> datetime:
    if now is None:
        now = conn.execute(select(func.now())).scalar_one()
    return now - older_than


def _delete_batch(conn: Connection, cutoff: datetime, group: str | None, batch_size: int) -> int:
    t = outbox_inbox
    victims = select(t.c.consumer_group, t.c.event_id).where(t.c.processed_at < cutoff)
    if group is not None:
        victims = victims.where(t.c.consumer_group == group)
    result = conn.execute(
        delete(t).where(
            tuple_(t.c.consumer_group, t.c.event_id).in_(victims.limit(batch_size))
        )
    )
    return int(result.rowcount)


def _dead_letter(row: Any) -> DeadLetter:
    return DeadLetter(**{name: row[name] for name in DeadLetter.__dataclass_fields__})


def _headers_from_json(headers: dict[str, str]) -> list[tuple[str, bytes]]:
    """The inverse of `envelope.headers_as_json`: values it hex-encoded become bytes again."""
    result: list[tuple[str, bytes]] = []
    for name, value in headers.items():
        raw = value.encode()
        if value.startswith(_HEX):
            with contextlib.suppress(ValueError):
                raw = bytes.fromhex(value[len(_HEX):])
        result.append((name, raw))
    return result


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
