"""Failpoints: let a test kill this process at the exact step a guarantee depends on.

`OUTBOX_FAILPOINT` holds `name[:N][,name[:N]...]`. The N-th time the code
passes `failpoint(name)` (N defaults to 1) the process sends itself SIGKILL:
no `finally`, no atexit, no flush, as when the machine loses power. The
names in use:

    consumer-after-db-commit   a consumer transaction (a batch of inbox rows
                               and effects, or dead letters) committed, its
                               Kafka offsets not yet (outbox/consumer.py)
    relay-after-ack            the broker acknowledged, the outbox row not yet
                               deleted (relay/)

The variable is read once, at the first `failpoint` call. Unset (the normal
case) a failpoint costs one dict lookup. This module must never do anything
but count and kill: no logging after the decision, no cleanup.
"""

from __future__ import annotations

import os
import signal
import threading

from outbox.errors import ConfigError

FAILPOINT_ENV = "OUTBOX_FAILPOINT"

_lock = threading.Lock()
_armed: dict[str, int] | None = None
_hits: dict[str, int] = {}


def parse(spec: str) -> dict[str, int]:
    """`"a,b:3"` -> `{"a": 1, "b": 3}`; raises `ConfigError` on a malformed spec."""
    armed: dict[str, int] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, count = item.partition(":")
        name = name.strip()
        if not name:
            raise ConfigError(FAILPOINT_ENV, f"{item!r} has no failpoint name")
        if not sep:
            armed[name] = 1
            continue
        try:
            nth = int(count)
        except ValueError:
            raise ConfigError(FAILPOINT_ENV, f"{item!r}: {count!r} is not an integer") from None
        if nth < 1:
            raise ConfigError(FAILPOINT_ENV, f"{item!r}: the hit count must be 1 or more")
        armed[name] = nth
    return armed


def failpoint(name: str) -> None:
    """Kill this process with SIGKILL if `name` is armed and this is its N-th hit."""
    global _armed
    armed = _armed
    if armed is None:
        with _lock:
            if _armed is None:
                _armed = parse(os.environ.get(FAILPOINT_ENV, ""))
            armed = _armed
    nth = armed.get(name)
    if nth is None:
        return
    with _lock:
        _hits[name] = _hits.get(name, 0) + 1
        if _hits[name] == nth:
            os.kill(os.getpid(), signal.SIGKILL)


def reset() -> None:
    """Forget the parsed variable and the hit counts (for tests that change the variable)."""
    global _armed
    with _lock:
        _armed = None
        _hits.clear()
