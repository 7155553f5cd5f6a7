"""The child-process helpers the tests, the benchmark and the demo share (harness/procs.py),
on real processes."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from harness import procs

# Prints a line, says "stopped" on SIGTERM and exits 0, as the relay does.
GRACEFUL = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *_: (print('stopped: published=7', flush=True), sys.exit(0)))\n"
    "print('started', flush=True)\n"
    "while True: time.sleep(0.05)\n"
)
STUBBORN = (
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('started', flush=True)\n"
    "while True: time.sleep(0.05)\n"
)


def _child(code: str, log: Path | None = None) -> procs.Child:
    return procs.Child("probe", [sys.executable, "-c", code], dict(os.environ), log=log)


def _wait_for(child: procs.Child, text: str) -> None:
    deadline = time.monotonic() + 10
    while text not in child.tail(50):
        assert time.monotonic() < deadline, child.tail()
        time.sleep(0.05)


def test_a_child_stopped_cleanly_keeps_its_last_output_after_its_temporary_log_is_removed() -> None:
    child = _child(GRACEFUL).start()
    _wait_for(child, "started")
    stopped = child.stop(timeout=10)
    assert stopped == procs.Stopped(0, forced=False)
    assert not child.log.exists()
    assert "stopped: published=7" in child.tail(50)


def test_a_child_that_ignores_sigterm_is_killed_and_reported_as_forced(tmp_path: Path) -> None:
    child = _child(STUBBORN, tmp_path / "probe.log").start()
    _wait_for(child, "started")
    stopped = child.stop(timeout=0.5)
    assert stopped == procs.Stopped(-signal.SIGKILL, forced=True)
    assert (tmp_path / "probe.log").exists(), "a log that was asked for is kept"


def test_a_killed_child_starts_again_and_appends_to_the_same_log(tmp_path: Path) -> None:
    child = _child(GRACEFUL, tmp_path / "probe.log").start()
    _wait_for(child, "started")
    first = child.pid
    child.kill()
    assert not child.running()
    child.start()
    _wait_for(child, "started\nstarted")
    assert child.pid != first and child.starts == 2
    assert child.stop(timeout=10).returncode == 0


def test_a_paused_child_still_stops_on_sigterm(tmp_path: Path) -> None:
    child = _child(GRACEFUL, tmp_path / "probe.log").start()
    _wait_for(child, "started")
    child.pause()
    assert child.stop(timeout=10) == procs.Stopped(0, forced=False)


def test_a_child_never_started_stops_as_a_clean_zero() -> None:
    child = _child(GRACEFUL)
    assert child.stop() == procs.Stopped(0, forced=False)
    assert not child.log.exists()
