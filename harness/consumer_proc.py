"""The kit's `Consumer` in a process of its own, so a caller can SIGKILL it (directly
or via OUTBOX_FAILPOINT) and start it again: `python -m harness.consumer_proc`.

    python -m harness.consumer_proc --group G --topic T [--expect N] [--handler pkg.mod:function]
                                    [--transport kafka|rabbitmq [--queues N]]

The one consumer process of the tests and the benchmark (the tests' own
entry point, `python -m tests.consumer_proc`, is this module). Addresses come
from `--database-url`/`--bootstrap-servers`, else OUTBOX_DATABASE_URL and
OUTBOX_KAFKA_BOOTSTRAP_SERVERS (`--transport rabbitmq`: OUTBOX_RABBITMQ_URL,
the group's queues declared by the consumer). The default handler, `record_effect`, inserts
one row per application into `test_consumer_effect` (no unique key, so a
double application shows as two rows).

With `--expect N` it runs until that table holds N distinct events of the
topic and one poll came back empty, then prints the consumer's stats as one
JSON line on stdout and exits 0 (1 after `--timeout`). Without it, it runs
until SIGTERM, as a deployment does. Logs go to stderr.
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
from outbox.dead_letters import import_handler
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


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m harness.consumer_proc")
    parser.add_argument("--group", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--expect", type=int,
                        help="stop once test_consumer_effect holds this many events of the topic")
    parser.add_argument("--timeout", type=float, default=80.0, help="with --expect: give up after")
    parser.add_argument("--handler", default=f"{__name__}:record_effect",
                        help="package.module:function (default: record_effect)")
    parser.add_argument("--database-url", help="default: OUTBOX_DATABASE_URL")
    parser.add_argument("--bootstrap-servers", help="default: OUTBOX_KAFKA_BOOTSTRAP_SERVERS")
    parser.add_argument("--transaction-batch-size", type=int,
                        default=ConsumerConfig().transaction_batch_size)
    parser.add_argument("--application-name", default="outbox-consumer-proc",
                        help="the database connections' application_name")
    parser.add_argument("--transport", choices=("kafka", "rabbitmq"), default="kafka")
    parser.add_argument("--queues", type=int, help="rabbitmq: the group's queues (default 4)")
    parser.add_argument("--log-level", default="INFO")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    level = logging.getLevelName(args.log_level.upper())
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
    logging.getLogger("kafka").setLevel(max(level, logging.WARNING))
    logging.getLogger("pika").setLevel(max(level, logging.WARNING))

    engine = create_engine(args.database_url or database_url(), pool_size=2,
                           connect_args={"application_name": args.application_name})
    if args.expect is not None:
        with engine.begin() as conn:
            conn.execute(text(EFFECT_TABLE_DDL))
    config = ConsumerConfig(poll_timeout_ms=200, transaction_batch_size=args.transaction_batch_size)
    handler = import_handler(args.handler)
    if args.transport == "rabbitmq":
        from outbox.rabbitmq import RabbitMQ

        consumer = Consumer(engine, group=args.group, topics=[args.topic], handler=handler,
                            config=config, transport=RabbitMQ(queues=args.queues))
    else:
        consumer = Consumer(
            engine, group=args.group, topics=[args.topic], handler=handler, config=config,
            # Generous: a loaded 2-core CI machine can starve heartbeats for seconds.
            bootstrap_servers=args.bootstrap_servers,
            session_timeout_ms=10000, heartbeat_interval_ms=2000,
        )
    try:
        if args.expect is None:
            consumer.run()
            return 0
        return _until_applied(consumer, engine, args.topic, args.expect, args.timeout)
    finally:
        consumer.close()
        engine.dispose()


def _until_applied(consumer: Consumer, engine: Engine, topic: str, expect: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        handled = consumer.run_once(200)
        if handled == 0 and _applied(engine, topic) >= expect:
            print(json.dumps(asdict(consumer.stats)), flush=True)
            return 0
    print(json.dumps({"timeout": True, **asdict(consumer.stats)}), flush=True)
    return 1


def _applied(engine: Engine, topic: str) -> int:
    with engine.connect() as conn:
        count = conn.execute(
            text("SELECT count(DISTINCT event_id) FROM test_consumer_effect WHERE topic = :t"),
            {"t": topic},
        ).scalar_one()
    return int(count)


if __name__ == "__main__":
    sys.exit(main())
