"""The kit's child processes, for the tests, the benchmark and the demo: one way
to start, stop, SIGKILL, pause and restart `python -m relay` and consumers.

A `Child` is started by `start()` and may be started again after it died or
was killed (the demo's chaos does that); its output goes to one log file, kept
across restarts. `stop()` sends SIGTERM and, after a timeout, SIGKILL, so a
caller can tell a clean shutdown from one that had to be forced. No child
outlives the interpreter that started it.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from harness.devstack import REPO

_children: list[Child] = []


@dataclass(frozen=True)
class Stopped:
    returncode: int
    forced: bool  # SIGTERM was not enough within the timeout: it got SIGKILL


def stop(process: subprocess.Popen[bytes], *, timeout: float = 30.0) -> Stopped:
    """SIGTERM, wait up to `timeout`, then SIGKILL. A paused process gets SIGCONT
    first: stopped by SIGSTOP it could not act on SIGTERM at all."""
    if process.poll() is not None:
        return Stopped(process.returncode, forced=False)
    process.send_signal(signal.SIGCONT)
    process.send_signal(signal.SIGTERM)
    try:
        return Stopped(process.wait(timeout=timeout), forced=False)
    except subprocess.TimeoutExpired:
        process.kill()
        return Stopped(process.wait(), forced=True)


def child_env(
    database_url: str, bootstrap_servers: str, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """This process's environment for a child of the kit: pointed at these services,
    importing this checkout, unbuffered so a log shows what happened before a SIGKILL."""
    return {
        **os.environ,
        "OUTBOX_DATABASE_URL": database_url,
        "OUTBOX_KAFKA_BOOTSTRAP_SERVERS": bootstrap_servers,
        "PYTHONPATH": str(REPO),
        "PYTHONUNBUFFERED": "1",
        **(extra or {}),
    }


class Child:
    """One child process, with its output (stdout and stderr) appended to `log`.

    Without a `log` the output goes to a temporary file that is removed after
    a clean stop; `tail()` still returns its end then.
    """

    def __init__(
        self, name: str, argv: list[str], env: Mapping[str, str], *, log: Path | None = None
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env)
        self._temporary = log is None
        if log is None:
            fd, path = tempfile.mkstemp(prefix=f"outbox-{name}-", suffix=".log")
            os.close(fd)
            log = Path(path)
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._final_tail = ""
        self._lock = threading.Lock()  # the demo's chaos thread kills while the main thread stops

    def argv_for_start(self) -> list[str]:
        """The command line of the next start; a subclass may vary it per start."""
        return self.argv

    def start(self) -> Child:
        with self._lock, self.log.open("ab") as out:
            self.starts += 1
            self.process = subprocess.Popen(
                self.argv_for_start(), env=self.env, cwd=REPO, stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        if self not in _children:
            _children.append(self)
        return self

    @property
    def pid(self) -> int:
        return self._started().pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def check_alive(self) -> None:
        process = self._started()
        if process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {process.returncode}:\n{self.tail()}")

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "\n".join(self._final_tail.splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing of the process's shutdown path runs."""
        with self._lock:
            if self.running():
                assert self.process is not None
                self.process.kill()
                self.process.wait()

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def stop(self, timeout: float = 30.0) -> Stopped:
        """SIGTERM, then SIGKILL after `timeout`; a child never started counts as a clean 0."""
        with self._lock:
            stopped = Stopped(0, forced=False) if self.process is None else stop(
                self.process, timeout=timeout)
        if self._temporary and not stopped.forced and stopped.returncode in (0, -signal.SIGTERM):
            self._final_tail = self.tail(200)
            self.log.unlink(missing_ok=True)
        return stopped

    def __enter__(self) -> Child:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _signal(self, signum: int) -> None:
        with self._lock:
            if self.running():
                assert self.process is not None
                self.process.send_signal(signum)

    def _started(self) -> subprocess.Popen[bytes]:
        if self.process is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.process


@atexit.register
def _kill_all() -> None:
    """No child outlives its parent, whatever ended the parent."""
    for child in _children:
        if child.running():
            assert child.process is not None
            child.process.kill()


def relay(
    name: str, env: Mapping[str, str], *, log_level: str = "INFO", log: Path | None = None
) -> Child:
    """`python -m relay` as a deployment runs it (not started yet); settings come from `env`."""
    return Child(name, [sys.executable, "-m", "relay", "--log-level", log_level], env, log=log)


def consumer(
    name: str, args: list[str], env: Mapping[str, str], *, log: Path | None = None
) -> Child:
    """`python -m harness.consumer_proc ARGS` (not started yet)."""
    return Child(name, [sys.executable, "-m", "harness.consumer_proc", *args], env, log=log)


@dataclass(frozen=True)
class Exited:
    returncode: int
    output: str  # stdout and stderr together
    seconds: float


def run_until_exit(argv: list[str], env: Mapping[str, str], *, timeout: float) -> Exited:
    """A child expected to exit on its own (a refused setting); TimeoutError if it does not."""
    started = time.monotonic()
    proc = subprocess.Popen(
        argv, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO,
        stdin=subprocess.DEVNULL,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise TimeoutError(
            f"still running after {timeout}s:\n{out.decode(errors='replace')[-3000:]}"
        ) from None
    return Exited(proc.returncode, out.decode(errors="replace"), time.monotonic() - started)
