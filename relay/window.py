"""The relay's window: batches sent and not yet settled, and the rule that keeps
each key in commit order when one of them fails.

The relay keeps up to `OUTBOX_RELAY_MAX_IN_FLIGHT` batches in the producer at
once: while batch k's acknowledgements are on their way and its rows are
deleted, batch k+1 is already fetched (the oldest rows not in the window) and
sent. Batches are settled (deleted, failures counted) strictly in the order
they were sent, each with the lease epochs it was fetched under.

What the idempotent producer promises, and what it does not
-----------------------------------------------------------
Within one producer id and epoch, the broker appends a partition's batches
only in sequence order and never with a gap: batch n+1 is refused
(OutOfOrderSequence) until batch n is in the log, and retries are
deduplicated. So while nothing fails for good, the window is as safe as one
batch: the producer cannot tell batch k+1's records from more records of
batch k.

It stops promising that the moment the producer itself gives up on a batch.
On a batch that expires (delivery timeout) after it was sent, kafka-python
resets its producer id and sends the batches behind it with fresh sequence
numbers; on a non-retriable error it bumps the epoch and does the same;
librdkafka's gapless guarantee covers errors but not timeouts. A later event
of a key can then land while an earlier one did not, and a producer id
unknown to the broker is not deduplicated against the old one. With several
batches in the producer, more records are exposed to that.

The rule
--------
1. The relay gives up on a batch *before* the producer would expire it
   (`relay.sending.give_up_after`: a little under the delivery timeout) and
   then drops the producer so that it sends nothing more. Nothing in the
   window is therefore ever re-sequenced by the producer: for every
   partition, what that producer got into the log is a gapless prefix, in
   order, of what it was given.
2. The first failure in the window (or a delete fenced off by a lost lease)
   breaks it: nothing new is sent, every batch still in flight is waited
   out, and from then on, in window order, every event whose key already had
   a failed or held-back event is held back too: not deleted even when
   acknowledged, and not counted as a failure of its own. A fenced delete
   holds back everything after it. So per key the relay only ever deletes a
   prefix of the key's events in commit order.
3. Once the window is empty the producer is replaced (a new producer id),
   and the next fetch starts again from the oldest row left: each key is
   sent again from its first event that was not deleted, in commit order.

Per key, the log then holds a gapless in-order prefix from the old producer,
then the new producer's copies from the first event not deleted on: reading
it and skipping ids already seen (the inbox does) gives every event once in
commit order. An event parked for a failure of its own (too large, topic
gone) is the documented exception: it is out of the order until replayed.

A crash republishes at most the window, with the same ids: rows are deleted
only after acknowledgement, and batches whose delete is still queued
(relay/deleter.py) count against `OUTBOX_RELAY_MAX_IN_FLIGHT` with those in
flight.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from relay.publisher import Delivery, Sending
from relay.sending import HELD_BACK
from relay.store import Row


@dataclass(slots=True)
class InFlight:
    """One batch in the window: its rows, what the producer made of them, the
    leases it was fetched under (the delete is fenced by those epochs)."""

    rows: Sequence[Row]
    sending: Sending
    leases: dict[int, int]
    fetched_at: float = 0.0  # Unix time its fetch began: the batch's duration, its send span's start
    ids: str = field(init=False)  # the rows' ids, comma-separated, as the store takes them

    def __post_init__(self) -> None:
        self.ids = ",".join([row.id for row in self.rows])


class Window:
    """Up to `limit` batches in flight, oldest first."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._batches: deque[InFlight] = deque()
        self.broken = False  # a failure was seen: send nothing until the window is empty
        self._fenced = False  # a delete was fenced off: delete nothing more from this window
        self._blocked: set[tuple[str, str]] = set()  # keys with a failed or held-back event
        self.failed = 0  # since the window broke: events that failed, and
        self.held_back = 0  # later events of their keys (or after a fenced delete) held back

    def __len__(self) -> int:
        return len(self._batches)

    def open(self, deleting: int = 0) -> bool:
        """Whether another batch may be sent now, with `deleting` settled batches
        whose delete is not done yet (they count: a crash would send them again)."""
        return not self.broken and len(self._batches) + deleting < self.limit

    def full(self, deleting: int = 0) -> bool:
        return len(self._batches) + deleting >= self.limit

    def push(self, batch: InFlight) -> None:
        self._batches.append(batch)

    def head(self) -> InFlight:
        return self._batches[0]

    def pop(self) -> InFlight:
        return self._batches.popleft()

    def ids(self) -> str:
        """Every id in flight, comma-separated: what the next fetch leaves out."""
        return ",".join([batch.ids for batch in self._batches])

    def outcomes(self, batch: InFlight, deliveries: list[Delivery]) -> list[Delivery]:
        """`deliveries` of the batch at the head, with rule 2 applied (see the module docstring)."""
        if self._fenced:
            self.held_back += len(deliveries)
            return [HELD_BACK] * len(deliveries)
        blocked = self._blocked
        if not blocked and all(d.acknowledged for d in deliveries):
            return deliveries
        self.broken = True
        result = list(deliveries)
        for index, (row, delivery) in enumerate(zip(batch.rows, deliveries, strict=True)):
            key = (row.topic, row.key)
            if key in blocked:
                result[index] = HELD_BACK
                self.held_back += 1
            elif not delivery.acknowledged:
                blocked.add(key)
                self.failed += 1
        return result

    def fence(self) -> None:
        """A delete found leases lost: nothing still in the window is deleted by
        this relay (with nothing in it, there is nothing to hold back)."""
        if self._batches:
            self.broken = self._fenced = True

    def clear(self) -> list[InFlight]:
        """Start afresh (rule 3); returns the batches that were still in flight."""
        left = list(self._batches)
        self._batches.clear()
        self.broken = self._fenced = False
        self._blocked.clear()
        self.failed = self.held_back = 0
        return left
