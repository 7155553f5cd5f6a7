"""A consumer whose handler publishes a follow-up event, in a process a test can SIGKILL.

    python -m tests.followup_proc --group G --topic T --followup-topic F --expect N
                                  [--transaction-batch-size B]

The handler does what a ledger does when it posts a payment: it writes its
effect (one row in `test_followup_effect`, no unique key, so a double
application shows as two rows) and announces it with
`outbox.publish(session, ...)` in the same transaction, with a random event
id, so only the inbox can keep a redelivery from announcing it twice. The
follow-up's data names the input event (`source_event`); with no relay
running it stays in `outbox_event`, where the test counts it.

Reads OUTBOX_DATABASE_URL and OUTBOX_KAFKA_BOOTSTRAP_SERVERS (and
OUTBOX_FAILPOINT, to die at an exact step). Runs until the effect table
holds N distinct events of the topic and a poll came back empty, then prints
the consumer's stats as one JSON line on stdout; logs go to stderr.
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

import outbox
from outbox.config import database_url
from outbox.event import Event

EFFECT_TABLE_DDL = (
    "CREATE TABLE IF NOT EXISTS test_followup_effect ("
    " event_id uuid NOT NULL, topic text NOT NULL,"
    " applied_at timestamptz NOT NULL DEFAULT clock_timestamp())"
)
FOLLOWUP_TYPE = "ledger.posted"


def post_and_announce(session: Session, event: Event, *, followup_topic: str) -> None:
    """The effect and its follow-up event, both in the consumer's transaction."""
    session.execute(
        text("INSERT INTO test_followup_effect (event_id, topic) VALUES (:id, :topic)"),
        {"id": event.id, "topic": event.topic},
    )
    outbox.publish(
        session, topic=followup_topic, key=event.key, type=FOLLOWUP_TYPE,
        data={"source_event": str(event.id)},
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--group", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--followup-topic", required=True)
    parser.add_argument("--expect", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=80.0)
    parser.add_argument("--transaction-batch-size", type=int, default=50)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)

    engine = create_engine(database_url())
    with engine.begin() as conn:
        conn.execute(text(EFFECT_TABLE_DDL))

    def handler(session: Session, event: Event) -> None:
        post_and_announce(session, event, followup_topic=args.followup_topic)

    consumer = outbox.Consumer(
        engine, group=args.group, topics=[args.topic], handler=handler,
        config=outbox.ConsumerConfig(poll_timeout_ms=200,
                                     transaction_batch_size=args.transaction_batch_size),
        # The broker's shortest session: a restarted member waits this long for the killed one.
        session_timeout_ms=6000, heartbeat_interval_ms=1000,
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
            text("SELECT count(DISTINCT event_id) FROM test_followup_effect WHERE topic = :t"),
            {"t": topic},
        ).scalar_one()
    return int(count)


if __name__ == "__main__":
    sys.exit(main())
