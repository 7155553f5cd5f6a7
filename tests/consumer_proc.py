"""A consumer in its own process, so a test can SIGKILL it (via OUTBOX_FAILPOINT) and restart it.

    python -m tests.consumer_proc --group G --topic T --expect N [--transaction-batch-size B]

Reads OUTBOX_DATABASE_URL and OUTBOX_KAFKA_BOOTSTRAP_SERVERS. The handler
inserts one row per application into `test_consumer_effect` (no unique key,
so a double application shows as two rows). Runs until the effect table
holds N distinct events of the topic and one poll came back empty, then
prints the consumer's stats as one JSON line on stdout. Logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session

from outbox.config import database_url
from outbox.consumer import Consumer, ConsumerConfig
from outbox.event import Event

EFFECT_TABLE_DDL = (
    "CREATE TABLE IF NOT EXISTS test_consumer_effect ("
    " event_id uuid NOT NULL, topic text NOT NULL, data jsonb,"
    " applied_at timestamptz NOT NULL DEFAULT clock_timestamp())"
)


def record_effect(session: Session, event: Event) -> None:
    session.execute(
        text(
            "INSERT INTO test_consumer_effect (event_id, topic, data)"
            " VALUES (:id, :topic, CAST(:data AS jsonb))"
        ),
        {"id": event.id, "topic": event.topic, "data": json.dumps(event.data)},
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--group", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--expect", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=80.0)
    parser.add_argument("--transaction-batch-size", type=int,
                        default=ConsumerConfig().transaction_batch_size)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)

    engine = create_engine(database_url())
    with engine.begin() as conn:
        conn.execute(text(EFFECT_TABLE_DDL))
    consumer = Consumer(
        engine, group=args.group, topics=[args.topic], handler=record_effect,
        config=ConsumerConfig(poll_timeout_ms=200,
                              transaction_batch_size=args.transaction_batch_size),
        # Generous: a loaded 2-core CI machine can starve heartbeats for seconds.
        session_timeout_ms=10000, heartbeat_interval_ms=2000,
    )
    deadline = time.monotonic() + args.timeout
    try:
        while time.monotonic() < deadline:
            handled = consumer.run_once(200)
            if handled == 0 and _applied(engine, args.topic) >= args.expect:
                print(json.dumps(asdict(consumer.stats)), flush=True)
                return 0
        print(json.dumps({"timeout": True, **asdict(consumer.stats)}), flush=True)
        return 1
    finally:
        consumer.close()
        engine.dispose()


def _applied(engine: Engine, topic: str) -> int:
    with engine.connect() as conn:
        count = conn.execute(
            text("SELECT count(DISTINCT event_id) FROM test_consumer_effect WHERE topic = :t"),
            {"t": topic},
        ).scalar_one()
    return int(count)


if __name__ == "__main__":
    sys.exit(main())
