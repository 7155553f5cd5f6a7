"""The window's rule 2 (relay/window.py), without a broker: after a failure, every later
event of the failed event's key is held back, even when the broker acknowledged it."""

from __future__ import annotations

import uuid

from relay.publisher import ACKNOWLEDGED, Delivery, Settled
from relay.store import Row
from relay.window import InFlight, Window

FAILED = Delivery(False, "KafkaTimeoutError: expired")


def _row(key: str) -> Row:
    return Row(str(uuid.uuid4()), "t", key, "type", b"{}", "application/json", "{}", "2026-01-01T00:00:00.000000Z")


def _batch(keys: str, deliveries: list[Delivery]) -> InFlight:
    return InFlight([_row(k) for k in keys], Settled(deliveries), {0: 1})


def test_a_failed_event_holds_back_later_events_of_its_key_in_later_batches() -> None:
    window = Window(4)
    first = _batch("ab", [FAILED, ACKNOWLEDGED])
    second = _batch("abc", [ACKNOWLEDGED, ACKNOWLEDGED, ACKNOWLEDGED])  # acked, after a's failure
    third = _batch("a", [FAILED])
    for batch in (first, second, third):
        window.push(batch)
    assert window.open() is True
    outcomes = [window.outcomes(b, b.sending.wait()) for b in (window.pop(), window.pop(), window.pop())]
    assert window.broken and not window.open()  # nothing new is sent until the window is empty
    acked = [[d.acknowledged for d in batch] for batch in outcomes]
    assert acked == [[False, True], [False, True, True], [False]]
    assert not outcomes[1][0].attempted  # held back: not counted as a failure of its own
    assert (window.failed, window.held_back) == (1, 2)
    window.clear()
    assert window.open() and (window.failed, window.held_back) == (0, 0)


def test_a_fenced_delete_holds_back_everything_after_it() -> None:
    window = Window(2)
    batch = _batch("xy", [ACKNOWLEDGED, ACKNOWLEDGED])
    window.push(batch)
    window.fence()
    assert [d.acknowledged for d in window.outcomes(window.pop(), batch.sending.wait())] == [False, False]


def test_a_fenced_delete_with_nothing_left_in_flight_leaves_the_window_open() -> None:
    window = Window(2)
    window.fence()  # a late delete came back short after the window had emptied
    assert window.open() and not window.broken


def test_the_next_fetch_leaves_out_every_id_in_flight() -> None:
    window = Window(3)
    batches = [_batch("ab", [ACKNOWLEDGED] * 2), _batch("c", [ACKNOWLEDGED])]
    for batch in batches:
        window.push(batch)
    assert window.ids().split(",") == [row.id for b in batches for row in b.rows]
    assert window.full() is False
