"""The latency measurement's effect: one row per event, stamped with `clock_timestamp()`,
the moment the effect is written inside the transaction the consumer then commits.

The consumer process is `python -m harness.consumer_proc --handler bench.effects:record_effect`;
this module stays small because that process imports it.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.orm import Session

from outbox.event import Event

EFFECT_TABLE = "bench_latency_effect"
EFFECT_DDL = f"""
CREATE TABLE IF NOT EXISTS {EFFECT_TABLE} (
    event_id uuid NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""
_INSERT = text(f"INSERT INTO {EFFECT_TABLE} (event_id) VALUES (:event_id)")


def record_effect(session: Session, event: Event) -> None:
    session.execute(_INSERT, {"event_id": event.id})
