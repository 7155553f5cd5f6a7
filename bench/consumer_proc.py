"""The latency measurement's consumer, as its own process: `python -m bench.consumer_proc`.

Runs the kit's `Consumer` until SIGTERM; the handler writes one row per
event with `clock_timestamp()`, the moment the effect is written inside the
transaction the consumer then commits.
"""

from __future__ import annotations

import argparse
import logging

from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from outbox.consumer import Consumer, ConsumerConfig
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


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.consumer_proc")
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--bootstrap-servers", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    engine = create_engine(args.database_url, pool_size=2,
                           connect_args={"application_name": "outbox-bench-consumer"})
    consumer = Consumer(
        engine, group=args.group, topics=[args.topic], handler=record_effect,
        bootstrap_servers=args.bootstrap_servers, config=ConsumerConfig(poll_timeout_ms=200),
    )
    consumer.run()
    engine.dispose()


if __name__ == "__main__":
    main()
