"""Wait until a Kafka broker (or cluster) answers a real metadata request.

Used by ``devstack/devstack``; not part of the library. Exit status 0 once the
cluster metadata lists at least ``--brokers`` brokers (and, with ``--node``,
that broker id among them); non-zero after ``--timeout`` seconds, or at once
if the broker process given by ``--pid`` has died.

    python devstack/wait_kafka.py --bootstrap 127.0.0.1:19092 --timeout 90
"""

from __future__ import annotations

import argparse
import logging
import socket
import struct
import sys
import time
import warnings


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _api_versions_ok(address: str, timeout_s: float) -> bool:
    """Fallback without kafka-python: a raw ApiVersions v0 request must succeed."""
    host, _, port = address.rpartition(":")
    client_id = b"outbox-devstack-wait"
    header = struct.pack(">hhih", 18, 0, 1, len(client_id)) + client_id
    with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
        sock.sendall(struct.pack(">i", len(header)) + header)
        data = b""
        while len(data) < 10:  # size, correlation id, error code
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("connection closed")
            data += chunk
    _size, correlation_id, error_code = struct.unpack(">iih", data[:10])
    return bool(correlation_id == 1 and error_code == 0)


def _probe(bootstrap: str, timeout_ms: int) -> list[int]:
    """One metadata round trip; returns the broker ids the cluster reports."""
    try:
        from kafka import KafkaAdminClient
    except ImportError:  # no kafka-python for this interpreter: every address must answer
        addresses = bootstrap.split(",")
        if all(_api_versions_ok(a, timeout_ms / 1000) for a in addresses):
            return list(range(-len(addresses), 0))  # ids unknown; count only
        return []

    admin = KafkaAdminClient(
        bootstrap_servers=bootstrap.split(","),
        client_id="outbox-devstack-wait",
        request_timeout_ms=timeout_ms,
        bootstrap_timeout_ms=timeout_ms,
        reconnect_backoff_max_ms=500,
    )
    try:
        admin.list_topics()  # a real Metadata request
        cluster = admin.describe_cluster()
        return sorted(int(b["broker_id"]) for b in cluster["brokers"])
    finally:
        admin.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", required=True, help="host:port[,host:port...]")
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds (default 90)")
    parser.add_argument("--brokers", type=int, default=1, help="brokers that must be listed")
    parser.add_argument("--node", type=int, default=None, help="broker id that must be listed")
    parser.add_argument(
        "--each", action="store_true", help="every bootstrap address must answer by itself"
    )
    parser.add_argument(
        "--pid",
        type=int,
        action="append",
        default=[],
        help="broker process to watch; give up if it dies",
    )
    args = parser.parse_args()

    # kafka-python logs every refused connection while the broker boots.
    logging.basicConfig(level=logging.CRITICAL)

    deadline = time.monotonic() + args.timeout
    last_error = "no attempt yet"
    while True:
        for pid in args.pid:
            if not _pid_alive(pid):
                print(f"wait_kafka: broker process {pid} exited", file=sys.stderr)
                return 1
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            print(
                f"wait_kafka: {args.bootstrap} not ready after {args.timeout:.0f}s "
                f"(last: {last_error})",
                file=sys.stderr,
            )
            return 1
        timeout_ms = int(max(1.0, min(5.0, remaining)) * 1000)
        try:
            brokers = _probe(args.bootstrap, timeout_ms)
            if args.each:
                for address in args.bootstrap.split(","):
                    _probe(address, timeout_ms)
        except Exception as exc:  # any failure just means "not ready yet"
            last_error = f"{type(exc).__name__}: {exc}"
        else:
            node_ok = args.node is None or args.node in brokers or (brokers and brokers[0] < 0)
            if len(brokers) >= args.brokers and node_ok:
                return 0
            last_error = f"brokers listed: {brokers}"
        time.sleep(0.5)


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    sys.exit(main())
