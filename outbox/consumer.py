"""The consuming side: Kafka messages → inbox rows + handler effects, one transaction → offsets.

The messages of one poll are applied in ONE database transaction (up to
`transaction_batch_size` of them; 1 gives a transaction per message): one
`INSERT ... ON CONFLICT DO NOTHING RETURNING` claims all their event ids in
the inbox (unique key: consumer group, event id), then your handler runs for
each id that was new, in order. The unique key decides races: when two
members of a group meet the same event (a rebalance, a redelivery, the same
event published twice on two partitions) the second INSERT waits for the
first transaction and then returns nothing, so the loser skips the handler
(two batches that meet the same events in opposite order deadlock;
PostgreSQL fails one of them, which is applied again message by message).
Kafka offsets (offset + 1, per partition) are committed only after the
transaction committed, at the end of `run_once`, never past a message whose
transaction did not commit. The happy path costs a round trip per batch for
the claim and one COMMIT per batch, plus whatever the handlers do.

    handler fails        the batch's transaction rolls back; the messages
                         before it are applied again without it (their
                         handlers run a second time) and commit; it is
                         retried alone, in its own transactions, with
                         exponential backoff and jitter (tenacity; the
                         batch's try was attempt 1); after `max_attempts` the
                         raw message is parked in `outbox_dead_letter`
                         (`outbox.dead_letters`, also to replay); batching goes
                         on with the next message.
    handler breaks the   commits, rolls back or closes the session (see
      contract           `outbox.handler`): refused before anything reaches
                         the database, and a failure like any other (retried,
                         then dead-lettered with an error saying what it did).
    malformed message    parked at once, in the batch's transaction, no retries
                         (includes what `publish` never writes: no key, NaN).
    database unreachable not the messages' fault: never parked. The consumer
                         waits (bounded exponential backoff) and retries the
                         uncommitted messages; their offsets stay uncommitted.
                         One WARNING when an outage starts (with its reason: a
                         refused login says so), one INFO when it ends.
    database wrong       checked before the first poll (`outbox.preflight`): a
                         refused login raises ConfigError, missing or older
                         tables SchemaError, one line each; a database that is
                         down then is waited for. Later, a kit statement that
                         finds its table missing raises SchemaError out of
                         `run_once`; no message is parked for it.
    batch commit fails   while the database answers (a deferred constraint, a
                         dropped connection): nobody can be blamed yet, so
                         that batch's messages are applied one by one.
    partitions revoked   everything handled was committed before the poll
                         that rebalances; an in-flight message is re-read by
                         the next owner and deduplicated by the inbox.

Inbox retention: the inbox only protects against redeliveries it still
remembers. Keep inbox rows (see `outbox.inbox.purge_inbox`) longer than the
topic's `retention.ms` plus the longest time a message may wait unconsumed;
otherwise an old message read again would be applied twice.

Follow-up events: a handler may `outbox.publish(session, ...)` with the
session it is given (a ledger announcing a posting). The outbox row is
then part of the consumer's transaction: it commits with the effect and
the inbox row, or not at all, so each follow-up exists exactly once iff
its effect committed, whatever kills the consumer when (proved by
`tests/integration/test_consumer_followups.py`). A follow-up's event id may be random;
the inbox, not the id, is what keeps a redelivery from publishing it twice.

Where the rest lives: this module is the loop (lifecycle, poll, the
batch -> alone -> retry -> dead-letter path, offsets, rebalances, signals,
stats and logs), read top to bottom; `outbox.consumer_config` its settings
and Kafka's, `outbox.inbox` the inbox SQL and `apply_event`,
`outbox.dead_letters` parking and replay, `outbox.handler` the handler
contract, `outbox.records` the typed Kafka record, `outbox.preflight` the
start checks.

This module must never commit an offset ahead of the database, dead-letter a
message because the database is down or wrong, let a handler commit its
batch, or log a payload or a secret.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from types import FrameType
from typing import Any, TypeVar

from kafka.structs import TopicPartition
from sqlalchemy import Engine, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    retry_if_not_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from outbox import dead_letters
from outbox.backoff import backoff, next_retry
from outbox.config import bootstrap_servers as resolve_bootstrap_servers
from outbox.consumer_config import ConsumerConfig, ConsumerStats, kafka_consumer_settings
from outbox.consumer_observer import ConsumerObserver
from outbox.errors import (
    ConfigError,
    HandlerContractError,
    KitStatementError,
    MalformedMessageError,
    OutboxError,
    TransactionEndedError,
    describe_error,
)
from outbox.event import Event
from outbox.failpoints import failpoint
from outbox.handler import Handler, HandlerGuard, check_handler, handler_name
from outbox.inbox import apply_event, claim, unclaim_events
from outbox.kafka_logging import protect_kafka_logs
from outbox.offsets import GroupOffsets
from outbox.preflight import check_consumer_database, login_refused
from outbox.records import KafkaRecord, decode_record, try_decode, where
from outbox.schema import outbox_dead_letter
from outbox.source import MessageSource, Transport

__all__ = [
    "Consumer",
    "ConsumerConfig",
    "ConsumerStats",
    "Handler",
    "HandlerContractError",
    "apply_event",
    "unclaim_events",
]

log = logging.getLogger(__name__)

FAILPOINT_AFTER_DB_COMMIT = "consumer-after-db-commit"

_T = TypeVar("_T")


class _GiveBack(Exception):
    """Stop the batch here; the unhandled rest is re-read (stop() or time budget)."""


class _DatabaseUnavailable(_GiveBack):
    """The database did not answer: wait and retry the same messages, never park them.

    The message is the reason, for the one log line of the outage.
    """


class _EffectsCommitted(HandlerContractError):
    """A handler committed below SQLAlchemy (see TransactionEndedError): parked at once, not retried."""


class _TransactionFailed(Exception):
    """A batch's transaction failed as a whole while the database answers: apply its messages alone."""


class _HandlerFailed(Exception):
    """The handler of the batch's record `index` raised `error`; the batch's transaction rolled back.

    `unclaim`: after a `TransactionEndedError`, the event ids whose inbox
    rows may have been committed without their effects.
    """

    def __init__(self, index: int, error: Exception, unclaim: set[uuid.UUID] | None = None) -> None:
        super().__init__(index, error)
        self.index = index
        self.error = error
        self.unclaim = unclaim


class Consumer:
    """Applies events from Kafka topics exactly once per consumer group.

    Example::

        consumer = Consumer(engine, group="ledger", topics=["payments"], handler=apply_payment)
        consumer.run()          # until stop() or SIGTERM; then commits and leaves the group

    `bootstrap_servers` defaults to `OUTBOX_KAFKA_BOOTSTRAP_SERVERS`. Kafka
    client settings come from `OUTBOX_KAFKA_*` (the ones KafkaConsumer knows),
    then from `**kafka_config`, which wins. `enable_auto_commit` must stay
    False and deserializers are not allowed: the consumer commits offsets
    itself and needs the raw bytes to dead-letter a message faithfully.

    `transport` (default: Kafka, as above) is where messages come from
    instead: `transport=outbox.rabbitmq.RabbitMQ()` consumes the group's
    RabbitMQ queues with the same handler, inbox and dead letters; Kafka
    settings are refused then (see `outbox.source`).

    `sleep` (default: an interruptible wait that `stop()` cuts short) is
    injectable so tests do not wait out the backoff.

    Raised, not retried: `ConfigError` from the constructor (a setting, or a
    handler that cannot be one: not callable, async, a generator, a wrong
    signature) and from the first `run_once` (the database refuses the
    login, or the role lacks a grant); `SchemaError` when the kit's tables
    are missing or older than the kit (first `run_once`, or any later one
    whose statement finds them gone). Retried: a handler's failure
    (`max_attempts`, then a dead letter), a database that does not answer
    (waited out, however long, also at the start), a Kafka commit that
    fails (the next batch tries again).

    Not thread-safe, except `stop()`, which any thread or a signal handler
    may call, twice, or before `run()`.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        group: str,
        topics: Sequence[str],
        handler: Handler,
        bootstrap_servers: str | None = None,
        config: ConsumerConfig | None = None,
        sleep: Callable[[float], object] | None = None,
        transport: Transport | None = None,
        **kafka_config: Any,
    ) -> None:
        if not group:
            raise ConfigError("group", "must be a non-empty consumer group id")
        if isinstance(topics, str) or not topics or not all(topics):
            raise ConfigError("topics", "must be a non-empty list of topic names")
        check_handler(handler)
        protect_kafka_logs()
        self.config = config if config is not None else ConsumerConfig.from_env()
        self.group = group
        self.topics = tuple(topics)
        self.stats = ConsumerStats()
        self._engine = engine
        self._handler = handler
        self._offsets: MessageSource  # where messages come from and go back to (outbox.source)
        if transport is None:  # Kafka
            self._kafka_config = kafka_consumer_settings(
                group, resolve_bootstrap_servers(bootstrap_servers), self.config, kafka_config
            )
            self._offsets = GroupOffsets(self._kafka_config, group=group, topics=self.topics)
        elif bootstrap_servers or kafka_config:
            raise ConfigError("transport", "Kafka settings do not apply to another transport")
        else:
            self._kafka_config = {}  # no Kafka: the observer probes the database only
            self._offsets = transport.open(group=group, topics=self.topics, config=self.config)
        self.observer = ConsumerObserver(group, self._kafka_config, engine)  # metrics and health
        self._polled = False  # polled once: in the group, or waiting for partitions (readiness)
        self._handler = self.observer.timed(handler)
        # A batch must be finished (or given back) well inside this, e.g. half of
        # max.poll.interval.ms, or the group evicts this member while it works.
        self._budget = self._offsets.time_budget
        worst_retry = (self.config.max_attempts - 1) * self.config.retry_backoff_max
        if worst_retry >= self._budget:
            raise ConfigError(
                "retry_backoff_max",
                f"(max_attempts - 1) x retry_backoff_max = {worst_retry}s must stay under half "
                f"of max_poll_interval_ms on Kafka ({self._budget}s; the transport's time budget)",
            )
        self._sleep = sleep if sleep is not None else self._stopping_wait
        self._stopping = threading.Event()
        self._closed = False
        self._deadline = 0.0
        self._database_checked = False  # the start checks passed (see outbox.preflight)
        self._outage_started: float | None = None  # monotonic time of the outage's first wait

    # -- lifecycle -------------------------------------------------------------

    def run(self) -> None:
        """Handle messages until `stop()` or SIGTERM, then `close()`.

        SIGTERM is caught only when called from the main thread, and the
        previous handler is restored on return.
        """
        log.info(
            "consumer starting: group=%s topics=%s %s",
            self.group, ",".join(self.topics), self._offsets.describe(),
        )
        try:
            with self._sigterm_stops():
                while not self._stopping.is_set():
                    self.run_once(self.config.poll_timeout_ms)
        finally:
            self.close()
        log.info(
            "consumer stopped: group=%s applied=%s duplicates=%s dead_lettered=%s retries=%s "
            "database_waits=%s",
            self.group, self.stats.applied, self.stats.duplicates, self.stats.dead_lettered,
            self.stats.retries, self.stats.database_waits,
        )

    def stop(self) -> None:
        """Ask `run()` to return after the current message. Safe from any thread, any time."""
        self._stopping.set()

    def close(self) -> None:
        """Commit the offsets of handled messages and leave the group. Idempotent."""
        self._stopping.set()
        if self._closed:
            return
        self._closed = True
        self.observer.close()
        self._offsets.close()

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the loop --------------------------------------------------------------

    def run_once(self, timeout_ms: int = 0) -> int:
        """Poll once (waiting up to `timeout_ms`), handle what arrived, commit offsets.

        The messages are applied in transactions of up to
        `transaction_batch_size` (see the module docstring);
        the offsets are committed once, at the end, after those transactions.
        Returns the number of messages handled (applied, duplicates and dead
        letters). Messages not handled, because `stop()` was called or the
        database stayed unreachable for the whole time budget, are given back:
        the next poll returns them again. The first call checks the database
        before it polls (see the class docstring for what it raises); while
        the database does not answer it waits, up to the time budget, and
        returns 0 without polling.
        """
        if self._closed:
            raise OutboxError("consumer is closed")
        # Kafka's client also gives the lag per partition; other sources have none.
        self.observer.polling(getattr(self._offsets, "client", None), polled=self._polled,
                              outage=self._offsets.outage)
        if not self._database_checked:
            self._deadline = time.monotonic() + self._budget
            if not self._check_database():
                return 0  # the database does not answer yet: nothing read, nothing joined
        batch = self._offsets.poll(timeout_ms, self.config.poll_batch_size)
        self._polled = True
        self._deadline = time.monotonic() + self._budget
        progress = {tp: records[0].offset for tp, records in batch.items() if records}
        records = [record for records in batch.values() for record in records]
        handled = 0

        def done(record: KafkaRecord) -> None:  # its transaction committed: its offset may follow
            nonlocal handled
            progress[TopicPartition(record.topic, record.partition)] = self._offsets.done(record)
            handled += 1

        alone_until = 0  # messages of a batch whose transaction failed as a whole go alone
        try:
            while handled < len(records):
                if self._out_of_time():
                    raise _GiveBack
                if handled < alone_until:
                    record = records[handled]
                    self._handle_alone(record)
                    done(record)
                    continue
                chunk = records[handled : handled + self.config.transaction_batch_size]
                try:
                    committed, failed = self._while_database_down(where(chunk[0], len(chunk)))(
                        self._apply_batch, chunk
                    )
                    self._end_outage()
                except _TransactionFailed as exc:
                    self._log_batch_failure(chunk, exc)
                    alone_until = handled + len(chunk)
                    continue
                for record in committed:
                    done(record)
                if failed is not None:
                    record, error = failed
                    self._handle_alone(record, error)
                    done(record)
        except _GiveBack:
            self._offsets.give_back(batch, progress)
        except BaseException:
            self._offsets.give_back(batch, progress)
            raise
        finally:
            self._offsets.commit()
        return handled

    def _apply_batch(
        self, records: Sequence[KafkaRecord]
    ) -> tuple[list[KafkaRecord], tuple[KafkaRecord, Exception] | None]:
        """Apply `records` in one transaction, up to the first handler failure.

        Returns the records whose work committed, in order, and the record
        whose handler raised (with its error, kept for the retries) or None;
        the records after it are not touched. A handler failure rolls the
        whole transaction back, so the records before the failed one are
        applied again, in a new transaction, without it (their handlers run
        twice; only the committed run has effects). Raises
        `_DatabaseUnavailable` when nothing committed because the database
        does not answer, `_TransactionFailed` when the transaction failed as
        a whole although it does.
        """
        failed: tuple[Any, Exception] | None = None
        while records:
            started = time.perf_counter()
            try:
                committed = self._apply_in_one_transaction(records)
                self.observer.batch_committed(time.perf_counter() - started)
            except _HandlerFailed as failure:
                failed = (records[failure.index], failure.error)
                records = records[: failure.index]
                continue
            # A shorter `committed` is a batch cut by stop() or the time budget:
            # the failed record no longer follows it, so it is re-read instead.
            return committed, failed if len(committed) == len(records) else None
        return [], failed

    def _apply_in_one_transaction(self, records: Sequence[KafkaRecord]) -> list[KafkaRecord]:
        """Claim the records' event ids in the inbox (one statement), run the handlers, commit.

        No savepoint per message: those cost two round trips each, and a
        handler failure is rare enough to pay for with a rolled-back batch
        (`_HandlerFailed`, raised with nothing committed). Returns the records
        whose work committed: all of them, or fewer when stop() or the time
        budget cut the batch short.
        """
        done: list[tuple[Any, Callable[[], None]]] = []  # record, its stats and log line
        try:
            with Session(self._engine) as session:
                session.begin()
                decoded = [try_decode(record) for record in records]
                claimed = claim(session, self.group, [e for e in decoded if isinstance(e, Event)])
                guard = HandlerGuard.for_session(session) if claimed else None
                for index, (record, event) in enumerate(zip(records, decoded, strict=True)):
                    if done and self._out_of_time():
                        # The rest is given back: its claims must not commit without its effects.
                        unclaim_events(session, self.group, claimed)
                        break
                    if not isinstance(event, Event):
                        note = self._park(session, record, event, attempts=1,
                                          event_id=dead_letters.raw_event_id(record.headers))
                        done.append((record, note))
                        continue
                    applied = event.id in claimed
                    if applied and guard is not None:
                        claimed.discard(event.id)  # a second copy in this batch is a duplicate
                        try:
                            guard.run(self._handler, event)
                        except TransactionEndedError as exc:
                            raise _HandlerFailed(index, exc, claimed | {event.id}) from exc
                        except Exception as exc:
                            raise _HandlerFailed(index, exc) from exc
                    done.append((record, partial(self._note_applied, event, applied)))
                if done:
                    session.commit()
        except _HandlerFailed as failure:
            # Checked after the session gave its connection back, so that a pool
            # of one connection cannot make the check wait for the session itself.
            problem = self._database_problem()
            if problem is not None:
                # Not the message's fault: wait and retry the whole batch.
                raise _DatabaseUnavailable(self._outage_reason(problem)) from failure.error
            if failure.unclaim:
                failure.error = self._repair_inbox(failure.error, failure.unclaim,
                                                   decoded[failure.index])
            raise
        except KitStatementError:
            raise
        except Exception as exc:
            # The transaction as a whole (the inbox claim, a dead letter, the
            # commit): nothing of it committed.
            problem = self._database_problem()
            if problem is not None:
                raise _DatabaseUnavailable(self._outage_reason(problem)) from exc
            raise _TransactionFailed(describe_error(exc)) from exc
        if done:
            failpoint(FAILPOINT_AFTER_DB_COMMIT)
            for _, note in done:
                note()
        return [record for record, _ in done]

    def _handle_alone(self, record: KafkaRecord, failed_attempt: Exception | None = None) -> None:
        """One message in transactions of its own: retries, then a dead letter; outages waited out.

        `failed_attempt` is the error of the attempt already made inside a
        batch: it counts as attempt 1.
        """
        for attempt in self._while_database_down(where(record, 1)):
            with attempt:
                self._handle(record, failed_attempt)
            failed_attempt = None  # after an outage the message starts over with fresh attempts
        self._end_outage()

    def _handle(self, record: KafkaRecord, failed_attempt: Exception | None) -> None:
        try:
            event = decode_record(record)
        except MalformedMessageError as exc:
            self._dead_letter(record, exc, attempts=1, event_id=dead_letters.raw_event_id(record.headers))
            return
        attempts = [0]
        try:
            applied = self._apply_with_retries(event, failed_attempt, attempts)
        except (_GiveBack, KitStatementError):
            raise
        except Exception as exc:
            self._dead_letter(record, exc, attempts=attempts[0], event_id=event.id)
            return
        failpoint(FAILPOINT_AFTER_DB_COMMIT)
        self._note_applied(event, applied)

    def _apply_with_retries(
        self, event: Event, failed_attempt: Exception | None, attempts: list[int]
    ) -> bool:
        """Apply `event` in a transaction, up to `max_attempts` times; `attempts[0]` counts them."""
        retrying = Retrying(
            retry=retry_if_not_exception_type((_GiveBack, KitStatementError, _EffectsCommitted)),
            stop=stop_after_attempt(self.config.max_attempts),
            wait=wait_random_exponential(
                multiplier=self.config.retry_backoff_base, max=self.config.retry_backoff_max
            ),
            sleep=self._pause,
            before_sleep=lambda state: self._log_retry(event, state),
            reraise=True,
        )
        earlier = [failed_attempt] if failed_attempt is not None else []

        def attempt() -> bool:
            attempts[0] += 1
            if earlier:
                raise earlier.pop()  # made in the batch: counted, logged and waited for as any
            try:
                return self._in_transaction(
                    lambda session: apply_event(
                        session, group=self.group, event=event, handler=self._handler
                    )
                )
            except TransactionEndedError as exc:
                raise self._repair_inbox(exc, {event.id}, event) from exc

        applied: bool = retrying(attempt)
        return applied

    def _repair_inbox(
        self, error: Exception, event_ids: set[uuid.UUID],
        event: Event | MalformedMessageError,
    ) -> Exception:
        """After `TransactionEndedError`: delete the inbox rows a handler's own commit made durable.

        Those of events whose handlers had not run, so that none is skipped as
        a duplicate; and the failed event's own, so that a replay applies it.
        Returns the error to go on with: `_EffectsCommitted` (no retries) if
        the failed event's row had been committed, since what its handler
        wrote before committing is durable and a retry would write it again.
        The one gap left: should the database go away before this repair
        commits, the rows stay, and those events are later skipped as
        duplicates (two faults at once, one of them a handler that went
        around every guard).
        """
        found = self._in_transaction(lambda session: unclaim_events(session, self.group, event_ids))
        if not found:
            return error  # it was a rollback: nothing became durable
        log.warning(
            "a handler committed below SQLAlchemy: deleted the inbox rows of %s event(s) whose "
            "effects had not committed, so they are applied again: group=%s event=%s",
            len(found), self.group, getattr(event, "id", None),
        )
        if isinstance(event, Event) and event.id in found:
            return _EffectsCommitted(
                f"handler {handler_name(self._handler)} committed the transaction itself, below "
                "SQLAlchemy (the driver's own connection), which the kit cannot refuse: its inbox "
                "row and what it wrote before that commit were durable. The row was deleted "
                "again; check those writes before replaying this dead letter"
            )
        return error

    def _dead_letter(
        self, record: KafkaRecord, exc: BaseException, *, attempts: int, event_id: uuid.UUID | None
    ) -> None:
        try:
            note = self._in_transaction(
                lambda session: self._park(
                    session, record, exc, attempts=attempts, event_id=event_id
                )
            )
        except (_GiveBack, KitStatementError):
            raise
        except Exception as parking_error:
            # Never the raw error: SQLAlchemy's message quotes the statement's
            # parameters, which hold the message's key and value.
            raise OutboxError(
                f"could not park the message in {outbox_dead_letter.name}: group={self.group} "
                f"topic={record.topic} partition={record.partition} offset={record.offset} "
                f"error={describe_error(parking_error)}"
            ) from None
        failpoint(FAILPOINT_AFTER_DB_COMMIT)
        note()

    def _park(
        self, session: Session, record: KafkaRecord, exc: BaseException, *, attempts: int,
        event_id: uuid.UUID | None,
    ) -> Callable[[], None]:
        """Add the dead letter to `session`'s transaction; returns its stats and log, for after commit."""
        error = describe_error(exc)
        parked = dead_letters.park(
            session, self.group, record, error=error, attempts=attempts, event_id=event_id
        )
        return partial(self._note_parked, record, error, attempts, event_id, parked)

    def _in_transaction(self, work: Callable[[Session], _T]) -> _T:
        """Run `work` in one transaction; an error while the database is down is not `work`'s."""
        try:
            with Session(self._engine) as session, session.begin():
                return work(session)
        except KitStatementError:
            raise
        except Exception as exc:
            # Whatever was raised (OperationalError, or a handler's wrapper of
            # it), if the database does not answer now the message is not to
            # blame. If it does answer, the error counts as a failed attempt.
            problem = self._database_problem()
            if problem is not None:
                raise _DatabaseUnavailable(self._outage_reason(problem)) from exc
            raise

    def _database_problem(self) -> Exception | None:
        """None if the database answers a query now, else why not."""
        try:
            with self._engine.connect() as conn:
                conn.execute(select(1))
        except Exception as exc:
            return exc
        return None

    def _outage_reason(self, problem: BaseException) -> str:
        refused = login_refused(problem)
        if refused is not None:
            return (f"the database refuses the consumer's login ({refused}); check the engine's "
                    "URL (OUTBOX_DATABASE_URL): the consumer waits until it is let in")
        return f"the database does not answer ({describe_error(problem)})"

    def _check_database(self) -> bool:
        """The start checks (`outbox.preflight`); False while the database does not answer.

        A refused login raises ConfigError and missing or older tables
        SchemaError, at once: waiting would not change them.
        """

        def check() -> None:
            try:
                check_consumer_database(self._engine)
            except DBAPIError as exc:  # ConfigError and SchemaError pass: waiting would not help
                raise _DatabaseUnavailable(self._outage_reason(exc)) from exc

        try:
            self._while_database_down("before the first poll")(check)
        except _GiveBack:  # stop(), or the time budget: the next run_once tries again
            return False
        self._end_outage()
        self._database_checked = True
        return True

    # -- waiting and stopping --------------------------------------------------

    def _stopping_wait(self, seconds: float) -> None:
        self._stopping.wait(seconds)

    def _pause(self, seconds: float) -> None:
        self.observer.beat()  # backing off is progress: /livez stays 200 through an outage
        self._sleep(seconds)
        if self._stopping.is_set():
            raise _GiveBack

    def _while_database_down(self, where: str) -> Retrying:
        # While the database is down, retry the same messages with bounded backoff;
        # when the time budget runs out the batch is given back and polled again,
        # which keeps this member in its group however long the outage lasts.
        return Retrying(
            retry=retry_if_exception_type(_DatabaseUnavailable),
            wait=backoff(self.config.db_backoff_base, self.config.db_backoff_max),
            stop=self._must_give_back,
            sleep=self._pause,
            before_sleep=lambda state: self._log_database_wait(where, state),
            reraise=True,
        )

    def _must_give_back(self, state: RetryCallState) -> bool:
        return self._out_of_time()

    def _out_of_time(self) -> bool:
        return self._stopping.is_set() or time.monotonic() >= self._deadline

    @contextmanager
    def _sigterm_stops(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        # No logging here: a signal handler may interrupt a log call holding its lock.
        self.stop()

    # -- stats and logs --------------------------------------------------------

    def _note_applied(self, event: Event, applied: bool) -> None:
        self.observer.applied(event, applied)
        if applied:
            self.stats.applied += 1
            log.debug(
                "applied event %s type=%s topic=%s partition=%s offset=%s",
                event.id, event.type, event.topic, event.partition, event.offset,
            )
        else:
            self.stats.duplicates += 1
            log.info(
                "duplicate event %s skipped: group=%s topic=%s partition=%s offset=%s",
                event.id, self.group, event.topic, event.partition, event.offset,
            )

    def _note_parked(
        self, record: KafkaRecord, error: str, attempts: int, event_id: uuid.UUID | None,
        parked: bool,
    ) -> None:
        self.stats.dead_lettered += 1
        self.observer.dead_lettered(record)
        log.error(
            "dead-lettered message: group=%s topic=%s partition=%s offset=%s event=%s "
            "attempts=%s error=%s%s",
            self.group, record.topic, record.partition, record.offset, event_id, attempts, error,
            "" if parked else " (already parked before)",
        )

    def _log_retry(self, event: Event, state: RetryCallState) -> None:
        self.stats.retries += 1
        self.observer.retry(event)
        exc, wait = next_retry(state)
        log.warning(
            "handler failed, retrying: event=%s type=%s topic=%s partition=%s offset=%s "
            "attempt=%s/%s wait=%.2fs error=%s",
            event.id, event.type, event.topic, event.partition, event.offset,
            state.attempt_number, self.config.max_attempts, wait,
            describe_error(exc) if exc is not None else "",
        )

    def _log_database_wait(self, where: str, state: RetryCallState) -> None:
        # One WARNING per outage, with its reason; the waits after it at DEBUG.
        self.stats.database_waits += 1
        exc, wait = next_retry(state)
        self.observer.database_wait(exc)
        if self._outage_started is None:
            self._outage_started = time.monotonic()
            log.warning(
                "database unavailable, waiting; nothing is dead-lettered and no offset moves "
                "until it answers: group=%s %s reason=%s",
                self.group, where, exc if exc is not None else "",
            )
        else:
            log.debug("database still unavailable: group=%s %s wait=%.2fs reason=%s",
                      self.group, where, wait, exc if exc is not None else "")

    def _end_outage(self) -> None:
        """Called where the database just answered: the outage's one closing line."""
        if self._outage_started is not None:
            self.observer.database_back()
            log.info("database available again after %.1fs: group=%s",
                     time.monotonic() - self._outage_started, self.group)
            self._outage_started = None

    def _log_batch_failure(self, records: Sequence[KafkaRecord], exc: _TransactionFailed) -> None:
        first = records[0]
        log.warning(
            "batch transaction failed, applying its messages one by one: group=%s topic=%s "
            "partition=%s offset=%s messages=%s error=%s",
            self.group, first.topic, first.partition, first.offset, len(records), exc,
        )
