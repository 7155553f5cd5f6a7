"""Liveness and readiness of one loop (the relay's or a consumer's), and the probes behind them.

    live    the loop made progress within `liveness_timeout` (a heartbeat).
            An outage never fails it: the loop keeps beating while it waits
            with backoff, because a restart cannot fix a broker or a database
            and only causes restart storms.
    ready   no problem is recorded: the database and the broker answer (the
            probes below, every few seconds, from a thread of their own),
            the loop is not waiting out an outage, and it has started.

Problems are named (`start`, `loop`, `database`, `broker`, `transport`) so that each
source sets and clears only its own; /readyz shows the first one, as one
line of JSON. `outbox.endpoints` serves both; this module does no HTTP.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from outbox.errors import describe_error

log = logging.getLogger(__name__)

# Long enough for the longest step a healthy loop blocks in (a publish that
# waits out the delivery timeout, a backoff at its maximum), so that an
# outage never reads as a dead process.
DEFAULT_LIVENESS_TIMEOUT = 60.0
PROBE_INTERVAL = 5.0  # seconds between database/broker probes (and backlog queries)
PROBE_TIMEOUT_MS = 4_000


class Health:
    """Heartbeat and named problems; thread-safe (the loop writes, the HTTP thread reads)."""

    def __init__(
        self, *, liveness_timeout: float = DEFAULT_LIVENESS_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.liveness_timeout = liveness_timeout
        self._clock = clock
        self._last_beat = clock()
        self._lock = threading.Lock()
        self._problems: dict[str, str] = {"start": "starting: the first checks have not passed yet"}

    def beat(self) -> None:
        self._last_beat = self._clock()

    def problem(self, name: str, reason: str | None) -> None:
        """Record (a reason) or clear (None) the problem `name`."""
        with self._lock:
            if reason is None:
                self._problems.pop(name, None)
            else:
                self._problems[name] = reason

    def live(self) -> str | None:
        """None when live, else why not."""
        quiet = self._clock() - self._last_beat
        if quiet > self.liveness_timeout:
            return f"main loop made no progress for {quiet:.0f}s (limit {self.liveness_timeout:.0f}s)"
        return None

    def ready(self) -> str | None:
        """None when ready, else the first problem."""
        with self._lock:
            if not self._problems:
                return None
            name = min(self._problems, key=_rank)
            return f"{name}: {self._problems[name]}"


_ORDER = {"start": 0, "loop": 1, "database": 2, "broker": 3, "transport": 4}


def _rank(name: str) -> int:
    return _ORDER.get(name, len(_ORDER))


class Ticker:
    """Call `work` every `interval` seconds on a daemon thread until `stop()`; errors are logged."""

    def __init__(self, name: str, interval: float, work: Callable[[], object]) -> None:
        self._interval = interval
        self._work = work
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> Ticker:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=PROBE_TIMEOUT_MS / 1000 + 5)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._work()
            except Exception:
                log.warning("%s failed", self._thread.name, exc_info=True)
            self._stopping.wait(self._interval)


class BrokerProbe:
    """Asks the Kafka cluster for its metadata; None when it answers, else why not.

    A client of its own (an admin client), so the probe never touches the
    loop's producer or consumer, which are not thread-safe. `settings` are
    kafka-python client settings (bootstrap servers and security ones);
    those an admin client does not know are left out.
    """

    def __init__(self, settings: Mapping[str, Any]) -> None:
        from kafka.admin import KafkaAdminClient

        self._settings = {k: v for k, v in settings.items() if k in KafkaAdminClient.DEFAULT_CONFIG}
        self._settings.update(
            request_timeout_ms=PROBE_TIMEOUT_MS, bootstrap_timeout_ms=PROBE_TIMEOUT_MS,
            client_id="outbox-health-probe",
        )
        self._admin: Any = None

    def __call__(self) -> str | None:
        from kafka.admin import KafkaAdminClient

        try:
            if self._admin is None:
                self._admin = KafkaAdminClient(**self._settings)
            self._admin.describe_cluster()
        except Exception as exc:
            self.close()
            return f"the broker does not answer ({describe_error(exc)})"
        return None

    def close(self) -> None:
        admin, self._admin = self._admin, None
        if admin is not None:
            try:
                admin.close()
            except Exception:
                log.debug("closing the probe's admin client failed", exc_info=True)


def database_problem(check: Callable[[], object]) -> str | None:
    """Run `check` (a `SELECT 1`, or a real query); None when it worked, else why not."""
    try:
        check()
    except Exception as exc:
        return f"the database does not answer ({describe_error(exc)})"
    return None
