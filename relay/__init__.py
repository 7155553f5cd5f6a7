"""The relay daemon: committed outbox events to Kafka, in commit order per key.

`relay/relay.py` is the loop, `relay/window.py` its batches in flight (and
order when one fails), `relay/deleter.py` their deletes beside the sending,
`relay/publisher.py` the contract with a broker,
`relay/publishers.py` the table of implementations (`relay/kafka.py`,
`relay/confluent.py`, sharing `relay/sending.py`), `relay/store.py` the SQL,
`relay/leases.py` the key-shard leases, `relay/daemon.py` the process
(signals, logging), `relay/options.py` its command-line options.

`Relay` is loaded on first use: `outbox db upgrade` and the other commands
that only need `relay.options` or `relay.config` must not pay for the loop,
psycopg and a Kafka client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from relay.config import RelayConfig

if TYPE_CHECKING:
    from relay.relay import Relay

__all__ = ["Relay", "RelayConfig"]


def __getattr__(name: str) -> Any:
    if name == "Relay":
        from relay.relay import Relay

        return Relay
    raise AttributeError(f"module 'relay' has no attribute {name!r}")
