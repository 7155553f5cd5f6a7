"""The relay daemon: committed outbox events to Kafka, in commit order per key.

`relay/relay.py` is the loop, `relay/kafka.py` the producer, `relay/store.py`
the SQL, `relay/daemon.py` the process (signals, logging).
"""

from relay.config import RelayConfig
from relay.relay import Relay

__all__ = ["Relay", "RelayConfig"]
