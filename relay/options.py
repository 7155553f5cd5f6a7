"""The relay's own command-line options, apart from the daemon.

`outbox --help` and `outbox db upgrade` build the whole command line, the
relay's options included; defining them here lets them do that without
importing the relay loop, psycopg or a Kafka client.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The relay's own options. `--database-url` and `--log-level` are shared
    by every command and come from `outbox.cli.shared_options()`, which the
    caller attaches as a parent parser (so they work on either side of `relay`)."""
    # Imported here: outbox.cli imports this module while it builds its parser.
    from outbox.cli import positive_float, positive_int

    parser.add_argument("--bootstrap-servers", help="default: $OUTBOX_KAFKA_BOOTSTRAP_SERVERS")
    parser.add_argument(
        "--batch-size", type=positive_int, help="default: $OUTBOX_RELAY_BATCH_SIZE or 500"
    )
    parser.add_argument(
        "--poll-interval", type=positive_float,
        help="seconds; default: $OUTBOX_RELAY_POLL_INTERVAL or 1.0",
    )
    parser.add_argument("--source", help="CloudEvents source; default: $OUTBOX_RELAY_SOURCE")
    parser.add_argument(
        "--metrics-port", type=int, metavar="PORT",
        help="serve /metrics, /livez and /readyz on this port; default: $OUTBOX_RELAY_METRICS_PORT or off",
    )
    parser.add_argument(
        "--metrics-host", metavar="HOST",
        help="address for --metrics-port; default: $OUTBOX_RELAY_METRICS_HOST or 127.0.0.1",
    )
