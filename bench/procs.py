"""Child processes the measurements run: relays (`python -m relay`) and the latency consumer."""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from bench.env import BenchEnv

REPO = Path(__file__).resolve().parent.parent
_children: list[Child] = []


class Child:
    """A child process with its output in a log file; `stop()` sends SIGTERM, then SIGKILL."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.log_path = Path(tempfile.mkstemp(prefix=f"outbox-bench-{name}-", suffix=".log")[1])
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            argv, env=env, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        _children.append(self)

    @property
    def pid(self) -> int:
        return self.process.pid

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.tail()}")

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> str:
        """Stop the process; returns the end of its output (the log is removed after a clean exit)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if not self._log.closed:
            self._log.close()
        tail = self.tail(50)
        if self.process.returncode in (0, -signal.SIGTERM):
            self.log_path.unlink(missing_ok=True)
        return tail

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: tuple[type[BaseException] | None, BaseException | None,
                                   TracebackType | None]) -> None:
        self.stop()


@atexit.register
def _stop_all() -> None:
    """No child outlives the benchmark, whatever ended it."""
    for child in _children:
        if child.process.poll() is None:
            child.process.kill()


def start_relay(env: BenchEnv, relay_id: str, *, log_level: str = "WARNING", **settings: str) -> Child:
    """`python -m relay` as a deployment runs it; `settings` are OUTBOX_RELAY_* values."""
    extra = {f"OUTBOX_RELAY_{k.upper()}": v for k, v in settings.items()}
    extra["OUTBOX_RELAY_ID"] = relay_id
    return Child(
        relay_id, [sys.executable, "-m", "relay", "--log-level", log_level], env.child_env(**extra)
    )


def wait_for_leases(env: BenchEnv, relays: list[Child], ids: list[str], timeout: float = 60.0) -> None:
    """Until each relay holds its fair share of the shards (16 / relays, rounded up or down)."""
    from outbox.schema import SHARDS

    low = SHARDS // len(ids)
    deadline = time.monotonic() + timeout
    with env.connect() as conn:
        while True:
            for relay in relays:
                relay.check_alive()
            owned = dict(conn.execute(
                "SELECT owner, count(*) FROM outbox_relay_lease WHERE expires_at > now() "
                "GROUP BY owner"
            ).fetchall())
            if all(owned.get(i, 0) >= low for i in ids) and sum(owned.values()) == SHARDS:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"relays did not share the shards within {timeout}s: {owned}")
            time.sleep(0.2)


def pids(children: list[Child]) -> set[int]:
    return {c.pid for c in children} | {os.getpid()}
