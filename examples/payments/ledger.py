"""The ledger service: payment events in, double-entry postings out, each exactly once.

`apply` is an `outbox.Consumer` handler: it runs inside the consumer's
database transaction together with the inbox row, so a captured payment
posts once however often Kafka delivers its event. Run it as a process:

    python -m examples.payments.ledger [--topic payments] [--group ledger] [--stats-file PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import threading
import uuid
from pathlib import Path

from sqlalchemy import create_engine, insert
from sqlalchemy.orm import Session

import outbox
from examples.payments.schema import applied_event, entry
from examples.payments.service import TOPIC

GROUP = "ledger"

# (account, debit?) legs of each posting kind; refunds are captures reversed.
LEGS = {
    "payment.captured": ("capture", [("cash", True), ("merchant_payable", False)]),
    "payment.refunded": ("refund", [("merchant_payable", True), ("cash", False)]),
}


def apply(session: Session, event: outbox.Event) -> None:
    data = event.data
    payment_id = uuid.UUID(data["payment_id"])
    session.execute(
        insert(applied_event).values(
            payment_id=payment_id, event_id=event.id, type=event.type,
            version=int(data["version"]), event_time=event.time,
        )
    )
    if event.type not in LEGS:
        return
    kind, legs = LEGS[event.type]
    amount = int(data["amount_minor"])
    session.execute(
        insert(entry),
        [
            {
                "payment_id": payment_id, "event_id": event.id, "kind": kind, "account": account,
                "debit_minor": amount if debit else 0, "credit_minor": 0 if debit else amount,
                "currency": data["currency"],
            }
            for account, debit in legs
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="ledger")
    parser.add_argument("--topic", default=TOPIC)
    parser.add_argument("--group", default=GROUP)
    parser.add_argument("--stats-file", type=Path, help="write the consumer's counters here")
    parser.add_argument(
        "--instance-id",
        help="Kafka static membership id: a restarted ledger with the same id takes its "
        "partitions back at once instead of waiting for a rebalance",
    )
    parser.add_argument(
        "--metrics-port", type=int, help="serve /metrics, /livez and /readyz on 127.0.0.1:PORT"
    )
    parser.add_argument("--transport", choices=("kafka", "rabbitmq"), default="kafka",
                        help="rabbitmq: the group's queues at OUTBOX_RABBITMQ_URL")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    engine = create_engine(os.environ["OUTBOX_DATABASE_URL"], pool_size=2)
    static = {"group_instance_id": args.instance_id} if args.instance_id else {}
    if args.transport == "rabbitmq":
        from outbox.rabbitmq import RabbitMQ

        logging.getLogger("pika").setLevel(logging.CRITICAL)
        consumer = outbox.Consumer(engine, group=args.group, topics=[args.topic], handler=apply,
                                   transport=RabbitMQ())  # the one line that differs from Kafka
    else:
        consumer = outbox.Consumer(
            engine, group=args.group, topics=[args.topic], handler=apply,
            # A ledger that died for good hands its partitions over within 10 s.
            session_timeout_ms=10_000, heartbeat_interval_ms=2_000, **static,
        )
    # The library's helper: the consumer's metrics and health over HTTP.
    endpoints = (outbox.serve_consumer_endpoints(consumer, port=args.metrics_port)
                 if args.metrics_port else None)
    stop_writing = threading.Event()

    def write_stats() -> None:
        while not stop_writing.wait(0.5):
            _write_stats(args.stats_file, consumer)

    if args.stats_file:
        threading.Thread(target=write_stats, daemon=True).start()
    try:
        consumer.run()
    finally:
        stop_writing.set()
        consumer.close()
        if endpoints is not None:
            endpoints.close()
        if args.stats_file:
            _write_stats(args.stats_file, consumer)


def _write_stats(path: Path | None, consumer: outbox.Consumer) -> None:
    if path is None:
        return
    values = dataclasses.asdict(consumer.stats)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({k: v for k, v in values.items() if isinstance(v, int)}))
    tmp.replace(path)


if __name__ == "__main__":
    main()
