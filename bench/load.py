"""Open-loop writers: events committed at a fixed offered rate, whatever the system does.

Each of `threads` writers has its own connection and its own schedule
(transaction i of writer w is due at t0 + (i * threads + w) / tx_rate). A
writer that falls behind starts the next transaction at once, without
skipping any, so a saturated system shows as an achieved rate below the
offered one and as `lag`, never as silently lower load. The commit time of
each event is the writer's wall clock right after COMMIT returned.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import Engine

import outbox
from bench.env import EVENT_TYPE


@dataclass
class LoadResult:
    offered: float  # events/s
    seconds: float
    events: int
    lag_max: float  # seconds a transaction started after it was due, worst case
    committed: dict[uuid.UUID, float] = field(default_factory=dict)  # event id -> wall time

    @property
    def achieved(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


def run_load(
    engine: Engine,
    *,
    topic: str,
    rate: float,
    seconds: float,
    events_per_tx: int = 1,
    threads: int = 4,
    stop: threading.Event | None = None,
    keys: int = 10_000,
    on_progress: Callable[[int], None] | None = None,
) -> LoadResult:
    """Commit `rate` events/s for `seconds` from `threads` paced writers."""
    tx_rate = rate / events_per_tx
    total_tx = int(tx_rate * seconds)
    results: list[dict[uuid.UUID, float]] = [{} for _ in range(threads)]
    lags = [0.0] * threads
    barrier = threading.Barrier(threads + 1)
    box: dict[str, float] = {}

    def work(w: int) -> None:
        mine = results[w]
        barrier.wait()
        t0 = box["t0"]
        i = w
        with engine.connect() as conn:
            while i < total_tx and not (stop and stop.is_set()):
                due = t0 + i / tx_rate
                now = time.monotonic()
                if now < due:
                    time.sleep(due - now)
                else:
                    lags[w] = max(lags[w], now - due)
                ids = []
                with conn.begin():
                    for j in range(events_per_tx):
                        key = f"payment-{(i * events_per_tx + j) % keys}"
                        event = outbox.publish(
                            conn, topic=topic, key=key, type=EVENT_TYPE,
                            data={"payment_id": key, "amount_minor": 1250, "currency": "EUR",
                                  "status": "captured", "n": i},
                            headers={"traceparent": f"00-{uuid.uuid4().hex}-{'0' * 16}-01"},
                        )
                        ids.append(event.id)
                committed_at = time.time()
                for event_id in ids:
                    mine[event_id] = committed_at
                i += threads

    workers = [threading.Thread(target=work, args=(w,), daemon=True) for w in range(threads)]
    for t in workers:
        t.start()
    box["t0"] = time.monotonic() + 0.05
    started = time.monotonic()
    barrier.wait()
    for t in workers:
        while t.is_alive():
            t.join(0.5)
            if on_progress:
                on_progress(sum(len(r) for r in results))
    elapsed = time.monotonic() - started
    committed: dict[uuid.UUID, float] = {}
    for r in results:
        committed.update(r)
    return LoadResult(rate, elapsed, len(committed), max(lags), committed)
