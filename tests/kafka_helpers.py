"""Reading what really reached the broker, and running relays, for the tests.

The processes themselves are `harness.procs`'s (shared with the benchmark and
the demo); these wrappers keep the tests' shape: a `Popen` back, and an
assertion when a relay ignores SIGTERM.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kafka import KafkaConsumer, TopicPartition

from harness import devstack, procs
from harness.devstack import REPO
from harness.procs import Exited
from relay import Relay, RelayConfig

__all__ = [
    "REPO",
    "SASL_PASSWORD",
    "SASL_USERNAME",
    "Exited",
    "Received",
    "first_occurrences",
    "read_topic",
    "relay_thread",
    "run_relay_until_exit",
    "sasl_bootstrap_servers",
    "start_relay_process",
    "stop_process",
    "wait_until",
]


@dataclass(frozen=True)
class Received:
    event_id: uuid.UUID
    key: str
    partition: int
    offset: int
    headers: dict[str, bytes]
    value: bytes


def read_topic(
    bootstrap_servers: str, topic: str, *, expect: int, timeout: float = 60.0
) -> list[Received]:
    """Every message on `topic`, in offset order per partition, waiting until at
    least `expect` distinct event ids arrived (or `timeout`)."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        consumer_timeout_ms=1000,
        isolation_level="read_committed",
    )
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        received: list[Received] = []
        ids: set[uuid.UUID] = set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            batches = consumer.poll(timeout_ms=500, max_records=5000)
            for records in batches.values():
                for r in records:
                    headers = dict(r.headers)
                    event_id = uuid.UUID(headers["ce_id"].decode())
                    ids.add(event_id)
                    received.append(
                        Received(event_id, r.key.decode(), r.partition, r.offset, headers, r.value)
                    )
            if len(ids) >= expect and not batches:
                break
        return received
    finally:
        consumer.close()


def first_occurrences(received: list[Received]) -> dict[str, list[uuid.UUID]]:
    """Per key, the event ids in the order a deduplicating consumer applies them."""
    by_key: dict[str, list[uuid.UUID]] = {}
    seen: set[uuid.UUID] = set()
    for r in sorted(received, key=lambda r: (r.partition, r.offset)):
        if r.event_id not in seen:
            seen.add(r.event_id)
            by_key.setdefault(r.key, []).append(r.event_id)
    return by_key


@contextmanager
def relay_thread(config: RelayConfig) -> Iterator[Relay]:
    """A relay running in this process until the block ends."""
    relay = Relay(config)
    thread = threading.Thread(target=relay.run, name="relay", daemon=True)
    thread.start()
    try:
        yield relay
    finally:
        relay.stop()
        thread.join(timeout=30)
        assert not thread.is_alive(), "relay did not stop within 30 s"


def _relay_env(
    database_url: str, bootstrap_servers: str, extra_env: dict[str, str] | None
) -> dict[str, str]:
    # Short polls and backoff: the tests wait on what the relay does next.
    return procs.child_env(database_url, bootstrap_servers, {
        "OUTBOX_RELAY_POLL_INTERVAL": "0.2",
        "OUTBOX_RELAY_BACKOFF_MAX": "2",
        **(extra_env or {}),
    })


def start_relay_process(
    database_url: str, bootstrap_servers: str, *, extra_env: dict[str, str] | None = None,
    log_path: Path | None = None,
) -> subprocess.Popen[bytes]:
    """`python -m relay` as a real process (so it can be SIGKILLed)."""
    child = procs.relay("relay", _relay_env(database_url, bootstrap_servers, extra_env),
                        log=log_path or Path(os.devnull)).start()
    assert child.process is not None
    return child.process


def stop_process(proc: subprocess.Popen[bytes], *, timeout: float = 30) -> int:
    stopped = procs.stop(proc, timeout=timeout)
    if stopped.forced:
        raise AssertionError(f"process ignored SIGTERM for {timeout:.0f} s")
    return stopped.returncode


def wait_until(predicate: object, *, timeout: float, interval: float = 0.1, what: str = "") -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")


def run_relay_until_exit(
    database_url: str, bootstrap_servers: str, *, extra_env: dict[str, str] | None = None,
    timeout: float = 30,
) -> Exited:
    """`python -m relay` that is expected to exit on its own (a refused setting)."""
    try:
        return procs.run_until_exit(
            [sys.executable, "-m", "relay", "--log-level", "INFO"],
            _relay_env(database_url, bootstrap_servers, extra_env), timeout=timeout,
        )
    except TimeoutError as exc:
        raise AssertionError(f"relay {exc}") from None


# The devstack broker's SASL_PLAINTEXT listener, as `devstack/devstack env` prints it.
_SASL = devstack.sasl_listener()
SASL_USERNAME = _SASL.username
SASL_PASSWORD = _SASL.password


def sasl_bootstrap_servers(bootstrap_servers: str) -> str:
    """The SASL listener of the broker the tests use: OUTBOX_TEST_KAFKA_SASL_SERVERS,
    else the devstack's (the only broker here that has one)."""
    return os.environ.get("OUTBOX_TEST_KAFKA_SASL_SERVERS") or _SASL.servers
