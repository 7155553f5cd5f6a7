"""The consumer's side of the Kafka group: the client, its partitions, and the
offsets that may be committed because their database transaction did.

Owns one rule: an offset is committed only after the transaction that
applied its message committed (`done`, then `commit`), never past a message
whose transaction did not. A message not handled is given back (`give_back`
seeks to it), so the next poll returns it again. kafka-python runs the
rebalance callbacks on its IO thread inside `poll()`; they only forget the
revoked partitions' pending offsets, since everything handled was committed
before that poll.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from kafka import KafkaConsumer
from kafka import errors as kafka_errors
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata, TopicPartition

from outbox.backoff import backoff_delay
from outbox.config import safe_kafka_config
from outbox.errors import describe_error
from outbox.kafka_refusals import connection_failures, not_authorized, raise_refusal, refused_names
from outbox.records import KafkaRecord

log = logging.getLogger("outbox.consumer")  # the consumer's log lines, under its name

Batch = Mapping[TopicPartition, Sequence[KafkaRecord]]


class GroupOffsets:
    """One consumer's membership in its group and its offsets still to commit:
    the Kafka `outbox.source.MessageSource`.

    Not thread-safe, like the consumer that owns it; the client is made (and
    the topics subscribed) on the first `poll`.
    """

    def __init__(self, settings: Mapping[str, Any], *, group: str, topics: Sequence[str]) -> None:
        self.group = group
        self.topics = tuple(topics)
        self.client: Any = None  # KafkaConsumer, untyped
        self.pending: dict[TopicPartition, int] = {}  # next offset to commit, per partition
        self._settings = dict(settings)
        self._outage: str | None = None
        self._outage_started: float | None = None
        self._failures = 0

    @property
    def time_budget(self) -> float:
        """Half of max.poll.interval.ms, in seconds: a batch must be finished (or given
        back) well inside it, or the group evicts this member while it works."""
        interval = self._settings.get(
            "max_poll_interval_ms", KafkaConsumer.DEFAULT_CONFIG["max_poll_interval_ms"])
        return float(interval) / 2000

    def describe(self) -> str:
        return f"kafka={safe_kafka_config(self._settings)}"

    def poll(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[KafkaRecord]]:
        self.commit()  # a commit that failed last time, before a poll can rebalance
        try:
            client = self._client()
            batch: dict[TopicPartition, list[KafkaRecord]] = client.poll(
                timeout_ms=timeout_ms, max_records=max_records
            )
        except kafka_errors.GroupAuthorizationFailedError:
            raise self._not_authorized("group", [self.group]) from None
        except kafka_errors.TopicAuthorizationFailedError as exc:
            raise self._not_authorized("topic", refused_names(exc, self.topics)) from None
        except KafkaError as exc:
            # kafka-python 3 raises connection errors out of poll() while it looks
            # for the group coordinator. An outage is the source's to wait out
            # (outbox/source.py): nothing was handed out, the client stays usable.
            if not _transient(exc):
                raise
            self._wait_out(exc, timeout_ms)
            return {}
        self._recovered()
        # A topic the user may not describe looks missing to kafka-python, which
        # logs its metadata error once and then waits on it forever, silently.
        refused = set(getattr(getattr(client, "_cluster", None), "unauthorized_topics", ()) or ())
        if refused & set(self.topics):
            raise self._not_authorized("topic", refused & set(self.topics))
        return batch

    @property
    def outage(self) -> str | None:
        """Why the broker is being waited out (one line), or None."""
        return self._outage

    def _wait_out(self, exc: KafkaError, timeout_ms: int) -> None:
        self._failures += 1
        if self._outage_started is None:
            self._outage_started = time.monotonic()
            log.warning("kafka unavailable to the consumer, waiting for it; nothing is handed out "
                        "until it answers: group=%s reason=%s", self.group, describe_error(exc))
        else:
            log.debug("kafka still unavailable: %s", describe_error(exc))
        self._outage = f"waiting for the broker: {describe_error(exc)}"
        # The kit's outage curve from the poll's own wait, at most 5 s (so that stop()
        # is never held up long); also no hot loop on run_once(0).
        time.sleep(backoff_delay(max(timeout_ms / 1000, 0.1), 5.0, self._failures))

    def _recovered(self) -> None:
        if self._outage_started is not None:
            log.info("kafka available to the consumer again after %.1fs: group=%s",
                     time.monotonic() - self._outage_started, self.group)
            self._outage_started = None
        self._outage = None
        self._failures = 0

    def done(self, record: KafkaRecord) -> int:
        """`record`'s transaction committed: its offset may follow. Returns the next offset."""
        tp = TopicPartition(record.topic, record.partition)
        self.pending[tp] = record.offset + 1
        return record.offset + 1

    def commit(self) -> None:
        if not self.pending or self.client is None:
            return
        offsets = {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in self.pending.items()}
        try:
            self.client.commit(offsets)
        except KafkaError as exc:
            if getattr(exc, "retriable", False):
                log.warning("offset commit failed, retrying after the next batch: %s",
                            describe_error(exc))
                return
            # The group moved on (rebalance, eviction): the new owner re-reads
            # from the last committed offset and the inbox skips what we applied.
            log.warning("offset commit refused, handled messages will be re-read and "
                        "deduplicated: group=%s error=%s", self.group, describe_error(exc))
        self.pending.clear()

    def give_back(self, batch: Batch, progress: Mapping[TopicPartition, int]) -> None:
        """Seek each partition of `batch` back to its first message not handled."""
        for tp, records in batch.items():
            if records and progress[tp] <= records[-1].offset:
                self.client.seek(tp, progress[tp])

    def forget(self, partitions: Sequence[TopicPartition]) -> None:
        # Called inside poll(), after everything handled was committed, so
        # anything left here is a commit that failed; the next owner re-reads it.
        for tp in partitions:
            self.pending.pop(tp, None)

    def close(self) -> None:
        """Commit what is pending and leave the group."""
        if self.client is None:
            return
        try:
            self.commit()
        finally:
            self.client.close(autocommit=False)

    def _client(self) -> Any:
        if self.client is None:
            # What the broker refuses (a login, a handshake, an ACL) is a setting,
            # not an outage: one ConfigError naming it (outbox.kafka_refusals).
            with connection_failures() as failures:
                try:
                    client = KafkaConsumer(**self._settings)
                except kafka_errors.KafkaTimeoutError:
                    raise_refusal(failures, self._settings)
                    raise
            # Learn the topics' partitions before joining: a group leader whose
            # metadata lacks a topic assigns nobody its partitions, and the group
            # only notices at the next metadata refresh (minutes later).
            try:
                for topic in self.topics:
                    if not client.partitions_for_topic(topic):
                        log.warning("topic %s does not exist (yet); consuming it once it does", topic)
                client.subscribe(topics=list(self.topics), listener=_RebalanceListener(self))
            except BaseException:
                # The broker went away in between: the next poll makes a new client,
                # so this one (and its IO thread) must not be left behind.
                client.close(autocommit=False)
                raise
            self.client = client
        return self.client

    def _not_authorized(self, what: str, names: Sequence[str] | set[str]) -> Exception:
        return not_authorized(what, names, "read", self._settings.get("sasl_plain_username"))


class _RebalanceListener(ConsumerRebalanceListener):  # type: ignore[misc]  # kafka is untyped
    # kafka-python runs these on its IO thread while the consumer is blocked in
    # poll(); they must not call blocking consumer APIs such as commit().
    def __init__(self, offsets: GroupOffsets) -> None:
        self._offsets = offsets

    def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        log.info("partitions revoked: group=%s partitions=%s", self._offsets.group,
                 _partitions(revoked))
        self._offsets.forget(list(revoked))

    def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        log.info("partitions assigned: group=%s partitions=%s", self._offsets.group,
                 _partitions(assigned))


def _partitions(tps: Sequence[TopicPartition]) -> str:
    return ",".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(tps))


def _transient(exc: KafkaError) -> bool:
    """A broker that does not answer (yet): connection refused, timed out, no coordinator."""
    return bool(getattr(exc, "retriable", False)) or isinstance(exc, kafka_errors.NoBrokersAvailable)
