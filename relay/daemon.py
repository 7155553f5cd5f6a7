"""`outbox relay` / `python -m relay`: the relay as a long-running process.

Owns what a library must not: logging handlers, signal handlers, the exit
code. SIGTERM or SIGINT lets the round in flight finish (its acknowledged
events are deleted, nothing half-done is left behind) and exits 0. SIGKILL
at any instant loses nothing: at most the last unacknowledged batch is
published again, with the same event ids.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from types import FrameType

from outbox.errors import ConfigError, OutboxError
from outbox.kafka_logging import protect_kafka_logs
from outbox.log_format import configure_daemon_logging, log_context
from outbox.log_format import log_format as read_log_format
from relay.config import RelayConfig
from relay.options import add_arguments
from relay.relay import Relay

# RelayConfig fields that `outbox relay` also takes as options (relay/options.py),
# each `--field-name` by argparse's own convention.
_OPTIONS = ("database_url", "bootstrap_servers", "batch_size", "poll_interval", "source",
            "metrics_port", "metrics_host")

log = logging.getLogger("relay")


def main(argv: Sequence[str] | None = None) -> int:
    from outbox.cli import Parser, apply_shared_defaults, shared_options

    parser = Parser(
        prog="outbox relay", description="Publish committed outbox events to Kafka (or RabbitMQ).",
        parents=[shared_options()],
    )
    add_arguments(parser)
    return run(apply_shared_defaults(parser.parse_args(argv), log_level="INFO"))


def run(args: argparse.Namespace) -> int:
    try:
        log_format = read_log_format()  # OUTBOX_LOG_FORMAT: text or json
    except OutboxError as exc:
        print(f"outbox relay: {exc}", file=sys.stderr)
        return 2
    configure_daemon_logging(
        getattr(logging, str(args.log_level).upper(), logging.INFO),
        text_format="%(asctime)s %(levelname)s %(name)s %(message)s", format=log_format,
    )
    # kafka-python logs every reconnect attempt at WARNING/ERROR; our own log
    # lines say what matters during an outage.
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    logging.getLogger("pika").setLevel(logging.CRITICAL)  # the same for RabbitMQ's client
    # Muted is not enough if a user turns it back on: the wire-level lines
    # (SASL bytes, records) stay redacted whatever the level.
    protect_kafka_logs()
    options = {name: getattr(args, name) for name in _OPTIONS}
    try:
        config = RelayConfig.from_env(**options)
        log_context(relay_id=config.relay_id)
        relay = Relay(config)
    except ConfigError as exc:
        # A value given as an option is named as the option, not as the field.
        if options.get(exc.field) is not None:
            exc = exc.named("--" + exc.field.replace("_", "-"))
        print(f"outbox relay: {exc}", file=sys.stderr)
        return 2
    except OutboxError as exc:
        print(f"outbox relay: {exc}", file=sys.stderr)
        return 2

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s: finishing the round in flight", signal.Signals(signum).name)
        relay.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        relay.run()
    except OutboxError as exc:
        # What waiting cannot fix (a refused password, no tables, a duplicate
        # relay id): one line and exit 2, so the orchestrator shows it.
        print(f"outbox relay: {exc}", file=sys.stderr)
        return 2
    return 0
