"""The handler contract: what a consumer's handler may do with the session it is given.

    handler(session, event)     apply `event` with `session`; return normally, or raise

The session's transaction is the consumer's. It also holds the inbox rows
that mark every event of the batch applied, and only the consumer may end it:
its COMMIT makes the batch's claims and effects durable together. A handler
that committed would make the claims of events whose handlers have not run
yet durable, and those events would then be skipped as duplicates. So the
handler may read, write, flush and open savepoints of its own
(`session.begin_nested()`), and must not commit, roll back or close.

It may publish follow-up events with `outbox.publish(session, ...)` (a
ledger announcing a posting): that is an INSERT into `outbox_event` in the
same transaction, which the guard lets through, so a follow-up commits
with its effect and the inbox row or not at all, and a redelivered event
is skipped before its handler could publish it again. Each follow-up thus
exists exactly once iff its effect committed, even with a random event id
(`tests/integration/test_consumer_followups.py` proves it with SIGKILLs).

While a handler runs, `HandlerGuard` holds it to that:

    refused at the call        session.commit() rollback() close() reset() invalidate() begin();
    (HandlerContractError)     session.connection().commit() rollback() close() invalidate();
                               the transaction object's commit(); a COMMIT, ROLLBACK, END, ABORT
                               or PREPARE TRANSACTION statement, through SQLAlchemy or through the
                               psycopg connection; the DBAPI connection's commit()
    noticed after the handler  a rollback by any other way (the DBAPI connection's rollback(), or
                               SQLAlchemy's after a failed flush the handler caught); a database
                               error the handler swallowed; a transaction that ended below the
                               driver (`TransactionEndedError`)

A refusal is recorded, so a handler that catches it fails all the same; a
handler that broke the contract fails like one that raised. Nothing the
guard refuses reaches the database. What it can only notice afterwards
(libpq's own connection, or a driver whose connection object cannot be
guarded, such as psycopg2's) may already have committed; the consumer
repairs the inbox then (see `TransactionEndedError`).

`check_handler` refuses, when the consumer is built, what cannot be a handler:
not callable, a signature that does not take (session, event), an async or
generator function (calling it would run nothing).
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from typing import Any, NoReturn

from sqlalchemy import Connection, event, select
from sqlalchemy.orm import Session, SessionTransaction

# The contract's errors live in the one error tree; re-exported here, where they are raised.
from outbox.errors import ConfigError, HandlerContractError, OutboxError, TransactionEndedError
from outbox.event import Event

__all__ = [
    "Handler",
    "HandlerContractError",
    "HandlerGuard",
    "TransactionEndedError",
    "check_handler",
    "handler_name",
]

Handler = Callable[[Session, Event], object]
"""`handler(session, event)`: apply `event` inside `session`'s open transaction.

The transaction also holds the other events of the batch. The handler must
not commit, roll back or close the session (the consumer refuses it, see
`outbox.handler`); it may open savepoints of its own with
`session.begin_nested()`. Raising is how it reports failure: the batch's
transaction is rolled back, which undoes every write in it, and the events
before the failed one are applied again without it. A database error it
catches and swallows also counts as a failure (PostgreSQL aborted the
transaction; only a savepoint of the handler's own could have kept the
work). It may run more than once for one event (retries, a neighbour's
failure), but its database effects are committed at most once per consumer
group; effects outside the database (an e-mail, an HTTP call) are not
covered and must be idempotent themselves.
"""

_CONTRACT = (
    "a handler must not end the consumer's transaction, which also holds the inbox rows "
    "of its batch: write through the session and let the consumer commit "
    "(session.begin_nested() gives a savepoint of the handler's own)"
)

# A statement that ends (or hands off) the transaction, at the start of the text or
# after a ';' (psycopg sends a parameterless text as one multi-statement query).
# ROLLBACK TO SAVEPOINT, RELEASE and SAVEPOINT are what begin_nested() issues.
_ENDS_TRANSACTION = re.compile(
    r"(?:^|;)\s*(?:(?:--[^\n]*(?:\n|$)|/\*.*?\*/)\s*)*"
    r"(COMMIT|END|ABORT|ROLLBACK(?!\s+(?:TO|PREPARED)\b)|PREPARE\s+TRANSACTION)\b",
    re.IGNORECASE | re.DOTALL,
)

_PQTRANS_IDLE = 0  # libpq's transaction status "idle, not in a transaction block"
_PQTRANS_INTRANS = 2  # libpq's transaction status "idle in a valid transaction block"
_PQTRANS_INERROR = 3  # "idle, in a failed transaction block" (psycopg, psycopg2)

_SESSION_METHODS = ("commit", "rollback", "close", "reset", "invalidate")
_CONNECTION_METHODS = ("commit", "rollback", "close", "invalidate")


def handler_name(handler: object) -> str:
    """`package.module:function` (what `import_handler` takes), or the best available."""
    target = handler.func if isinstance(handler, functools.partial) else handler
    module = getattr(target, "__module__", None) or type(target).__module__
    qualname = getattr(target, "__qualname__", None) or type(target).__qualname__
    return f"{module}:{qualname}"


def check_handler(handler: object, field: str = "handler") -> None:
    """Raise `ConfigError` (one line, naming the handler) unless `handler(session, event)` can work."""
    if not callable(handler):
        raise ConfigError(field, f"{handler!r} is not callable; expected handler(session, event)")
    name = handler_name(handler)
    # A callable object's own __call__ (functools.partial is looked through by inspect).
    call = None if inspect.isroutine(handler) else inspect.getattr_static(type(handler), "__call__", None)
    for target in (handler, call):
        if target is None:
            continue
        if inspect.iscoroutinefunction(target) or inspect.isasyncgenfunction(target):
            raise ConfigError(field, (
                f"{name} is an async function; the consumer calls handlers synchronously inside "
                "its database transaction, so awaiting would never happen: define it with def"
            ))
        if inspect.isgeneratorfunction(target):
            raise ConfigError(field, (
                f"{name} is a generator function; calling it would run none of its body: "
                "define it without yield"
            ))
    try:
        signature = inspect.signature(handler)
    except (TypeError, ValueError):  # some builtins and C callables have none to show
        return
    try:
        signature.bind(None, None)
    except TypeError as exc:
        raise ConfigError(field, (
            f"{name}{signature} cannot be called as handler(session, event): {exc}"
        )) from None


class HandlerGuard:
    """Holds the handlers run in one session's transaction to the handler contract.

    One guard per transaction (`for_session` finds or makes it); `run` arms
    it for the length of one handler call only, so the kit's own statements
    and its COMMIT pass. Where the driver's connection object takes
    attributes (psycopg 3), the guard sits there, under everything SQLAlchemy
    does: its commit() refuses, its rollback() is noticed, its cursors refuse
    statements that end the transaction. Elsewhere it listens to the
    SQLAlchemy connection's events instead, which SQLAlchemy's own paths
    pass through but the driver's do not.
    """

    _INFO_KEY = "outbox.handler_guard"

    def __init__(self, session: Session, transaction: SessionTransaction, connection: Connection):
        self._session = session
        self._transaction = transaction
        self._connection = connection
        self._running: object = None  # the handler, while it runs
        self._refused: str | None = None  # the first forbidden call, even if the handler caught it
        self._rolled_back = False
        self._session_vars = vars(session)
        self._connection_vars = vars(connection)
        self._session_overrides: dict[str, Any] = {
            method: functools.partial(self._refuse, f"session.{method}()")
            for method in _SESSION_METHODS
        }
        self._session_overrides["begin"] = self._begin
        self._connection_overrides = {
            method: functools.partial(self._refuse, f"session.connection().{method}()")
            for method in _CONNECTION_METHODS
        }
        self._dbapi = _dbapi_connection(connection)
        # The driver's connection: its attributes, the guard's, and its own it replaces.
        self._dbapi_vars, self._dbapi_overrides, self._dbapi_kept = _dbapi_guard(self._dbapi, self)
        if self._dbapi_vars is None:
            event.listen(connection, "commit", self._on_commit)
            event.listen(connection, "rollback", self._on_rollback)
            event.listen(connection, "before_cursor_execute", self._on_statement)

    @classmethod
    def for_session(cls, session: Session) -> HandlerGuard:
        """The guard of `session`'s current transaction (the session must be in one)."""
        transaction = session.get_transaction()
        if transaction is None:
            raise OutboxError("handlers run inside a transaction: call session.begin() first")
        guard = session.info.get(cls._INFO_KEY)
        if not isinstance(guard, HandlerGuard) or guard._transaction is not transaction:
            guard = cls(session, transaction, session.connection())
            session.info[cls._INFO_KEY] = guard
        return guard

    def run(self, handler: Handler, event_: Event) -> None:
        """Call `handler(session, event)`; raise if it failed or broke the contract.

        Its pending ORM changes are flushed afterwards (a failure there is the
        handler's), then the transaction is checked: still the consumer's,
        open, and not aborted by an error the handler swallowed.
        """
        self._refused = None
        self._rolled_back = False
        self._arm(handler)
        try:
            result = handler(self._session, event_)
        except Exception as exc:
            self._disarm()
            if self._refused is not None:
                self._discard()
                if not isinstance(exc, HandlerContractError):
                    raise HandlerContractError(self._refused) from exc
            raise
        self._disarm()
        if self._refused is not None:  # refused, and the handler caught it
            self._discard()
            raise HandlerContractError(self._refused)
        if inspect.isawaitable(result) or inspect.isgenerator(result):
            getattr(result, "close", lambda: None)()  # no "never awaited" warning
            raise HandlerContractError(
                f"handler {handler_name(handler)} returned {type(result).__name__} instead of "
                "running: handlers are called synchronously; define it with def, without async "
                "or yield"
            )
        self._session.flush()  # the handler's pending ORM changes: if they fail, it is its try
        self._check_transaction(handler)

    # -- while a handler runs -----------------------------------------------------

    def _arm(self, handler: object) -> None:
        self._running = handler
        self._session_vars.update(self._session_overrides)
        self._connection_vars.update(self._connection_overrides)
        if self._dbapi_vars is not None:
            self._dbapi_vars.update(self._dbapi_overrides)

    def _disarm(self) -> None:
        self._running = None
        for name in self._session_overrides:
            self._session_vars.pop(name, None)
        for name in self._connection_overrides:
            self._connection_vars.pop(name, None)
        if self._dbapi_vars is not None:
            for name in self._dbapi_overrides:
                self._dbapi_vars.pop(name, None)
            self._dbapi_vars.update(self._dbapi_kept)

    def _discard(self) -> None:
        # A refused commit may have left SQLAlchemy believing the transaction
        # over while the server still holds it open, with the batch's inbox
        # rows (its commit path marks the transaction done before the driver's
        # commit() refuses). Returned to the pool as it is, the next user of
        # that connection would inherit them. Closing the connection ends it there.
        self._connection.invalidate()

    def _refuse(self, what: str, *args: Any, **kwargs: Any) -> NoReturn:
        message = f"handler {handler_name(self._running)} called {what}: {_CONTRACT}"
        if self._refused is None:
            self._refused = message
        raise HandlerContractError(message)

    def _begin(self, nested: bool = False) -> SessionTransaction:
        if not nested:  # `with session.begin():` in a handler, the usual way to commit by mistake
            self._refuse("session.begin()")
        return Session.begin(self._session, nested=True)  # begin_nested(): the handler's savepoint

    def _on_commit(self, conn: Connection) -> None:
        if self._running is not None:  # raised before the driver's commit(): nothing is committed
            self._refuse("commit() on the session's transaction")

    def _on_rollback(self, conn: Connection) -> None:
        # Not refused: SQLAlchemy itself rolls back when a flush fails, and the
        # handler's own error then says more. Noticed, and checked afterwards.
        if self._running is not None:
            self._rolled_back = True

    def _on_statement(self, conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        if self._running is not None:
            self.check_statement(statement)

    def check_statement(self, statement: str) -> None:
        """Refuse a statement that would end the transaction (while a handler runs)."""
        if self._running is None:
            return
        match = _ENDS_TRANSACTION.search(statement)
        if match is not None:
            self._refuse(f"{' '.join(match.group(1).upper().split())} as a statement")

    def note_rollback(self) -> None:
        if self._running is not None:
            self._rolled_back = True

    # -- after it returned --------------------------------------------------------

    def _check_transaction(self, handler: object) -> None:
        """Raise unless the transaction is still the consumer's and PostgreSQL has not aborted it."""
        session, transaction, connection = self._session, self._transaction, self._connection
        ended = (
            self._rolled_back
            or session.get_transaction() is not transaction
            or not transaction.is_active
            or connection.invalidated
            or not connection.in_transaction()
        )
        if ended:
            raise HandlerContractError(
                f"the transaction was rolled back while handler {handler_name(handler)} ran (a "
                "rollback, or a failed statement or flush whose error it caught; only a savepoint "
                "of its own, session.begin_nested(), can recover from one): " + _CONTRACT
            )
        info = getattr(self._dbapi, "info", None)
        status = getattr(info, "transaction_status", None)
        if status == _PQTRANS_INTRANS:
            return
        name = handler_name(handler)
        if status is None:  # a driver that does not say: the server refuses a statement then
            session.execute(select(1))
        elif status == _PQTRANS_INERROR:
            raise HandlerContractError(
                f"a database error was swallowed inside handler {name} and PostgreSQL aborted "
                "the transaction; wrap the statement in session.begin_nested() to recover from it"
            )
        elif status == _PQTRANS_IDLE:
            raise TransactionEndedError(
                f"the transaction ended while handler {name} ran, below SQLAlchemy (the driver's "
                f"own connection); what it wrote before may be committed: {_CONTRACT}"
            )
        else:  # the connection broke: not the handler's doing
            raise OutboxError(f"the database connection was lost while handler {name} ran")


def _dbapi_connection(connection: Connection) -> Any:
    try:
        return connection.connection.dbapi_connection
    except Exception:  # invalidated or closed: the checks afterwards say so
        return None


def _dbapi_guard(
    dbapi: Any, guard: HandlerGuard
) -> tuple[dict[str, Any] | None, dict[str, Any], dict[str, Any]]:
    """The driver connection's attributes, the guard's overrides, and what they replace.

    psycopg 3's connection takes attributes; a C type such as psycopg2's
    does not, and then (None, {}, {}): the guard listens to SQLAlchemy's
    events instead.
    """
    try:
        attributes = vars(dbapi)
    except TypeError:
        return None, {}, {}
    original_rollback = dbapi.rollback

    def rollback() -> None:
        guard.note_rollback()
        original_rollback()

    overrides: dict[str, Any] = {
        "commit": functools.partial(guard._refuse, "commit() on the database connection"),
        "rollback": rollback,
        "_outbox_guard": guard,
    }
    kept: dict[str, Any] = {}
    factory = attributes.get("cursor_factory")
    if isinstance(factory, type):
        overrides["cursor_factory"] = _guarded_cursor(factory)
        kept["cursor_factory"] = factory
    return attributes, overrides, kept


@functools.cache
def _guarded_cursor(base: type) -> type:
    """`base` (a psycopg cursor class) refusing statements that end the transaction."""

    def guarded(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def call(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
            guard = getattr(self.connection, "_outbox_guard", None)
            if isinstance(guard, HandlerGuard):
                guard.check_statement(_query_text(query, self))
            return method(self, query, *args, **kwargs)

        return call

    namespace = {
        name: guarded(getattr(base, name))
        for name in ("execute", "executemany", "stream")
        if callable(getattr(base, name, None))
    }
    return type(f"Guarded{base.__name__}", (base,), namespace)


def _query_text(query: Any, cursor: Any) -> str:
    if isinstance(query, str):
        return query
    if isinstance(query, bytes | bytearray | memoryview):
        return bytes(query).decode("utf-8", "replace")
    as_string = getattr(query, "as_string", None)  # psycopg.sql.Composable
    if callable(as_string):
        try:
            return str(as_string(cursor))
        except Exception:
            return ""
    return str(query)
