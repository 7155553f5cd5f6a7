"""Reading what really reached the broker, and running relays, for the tests."""

from __future__ import annotations

import os
import signal
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

from relay import Relay, RelayConfig

REPO = Path(__file__).resolve().parent.parent


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


def start_relay_process(
    database_url: str, bootstrap_servers: str, *, extra_env: dict[str, str] | None = None,
    log_path: Path | None = None,
) -> subprocess.Popen[bytes]:
    """`python -m relay` as a real process (so it can be SIGKILLed)."""
    env = {
        **os.environ,
        "OUTBOX_DATABASE_URL": database_url,
        "OUTBOX_KAFKA_BOOTSTRAP_SERVERS": bootstrap_servers,
        "OUTBOX_RELAY_POLL_INTERVAL": "0.2",
        "OUTBOX_RELAY_BACKOFF_MAX": "2",
        "PYTHONPATH": str(REPO),
        **(extra_env or {}),
    }
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, "-m", "relay", "--log-level", "INFO"],
        env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
    )


def stop_process(proc: subprocess.Popen[bytes], *, timeout: float = 30) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError("process ignored SIGTERM for 30 s") from None
    return proc.returncode


def wait_until(predicate: object, *, timeout: float, interval: float = 0.1, what: str = "") -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")


@dataclass(frozen=True)
class Exited:
    returncode: int
    output: str  # stdout and stderr together
    seconds: float


def run_relay_until_exit(
    database_url: str, bootstrap_servers: str, *, extra_env: dict[str, str] | None = None,
    timeout: float = 30,
) -> Exited:
    """`python -m relay` that is expected to exit on its own (a refused setting)."""
    env = {
        **os.environ,
        "OUTBOX_DATABASE_URL": database_url,
        "OUTBOX_KAFKA_BOOTSTRAP_SERVERS": bootstrap_servers,
        "OUTBOX_RELAY_POLL_INTERVAL": "0.2",
        "OUTBOX_RELAY_BACKOFF_MAX": "2",
        "PYTHONPATH": str(REPO),
        **(extra_env or {}),
    }
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "--log-level", "INFO"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(
            f"relay still running after {timeout}s:\n{out.decode(errors='replace')[-3000:]}"
        ) from None
    return Exited(proc.returncode, out.decode(errors="replace"), time.monotonic() - started)


# The devstack broker's SASL_PLAINTEXT listener (devstack/devstack: client port + 2).
SASL_USERNAME = "outbox"
SASL_PASSWORD = "outbox-sasl-secret"


def sasl_bootstrap_servers(bootstrap_servers: str) -> str:
    explicit = os.environ.get("OUTBOX_TEST_KAFKA_SASL_SERVERS")
    if explicit:
        return explicit
    host, _, port = bootstrap_servers.split(",")[0].rpartition(":")
    return f"{host}:{int(port) + 2}"
