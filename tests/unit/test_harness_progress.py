"""The demo's and the benchmark's progress bars count a rate from their own start."""

from __future__ import annotations

import re
import time

import pytest

from harness.progress import bar


def _rate(text: str) -> float:
    found = re.search(r"([\d.]+) event/s", text)
    assert found, text
    return float(found.group(1))


def test_a_bar_started_late_counts_only_the_items_it_saw_in_its_rate(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The ledger had applied 900 events before its bar appeared; 100 more follow
    # in >= 0.2 s. The old hand-written bar divided all 1,000 by its own age.
    progress = bar("ledger applied", 1000, initial=900, unit="event")
    time.sleep(0.2)
    progress.reach(1000)
    assert _rate(str(progress)) <= 100 / 0.2
    progress.close()


def test_a_count_that_goes_back_does_not_move_the_bar(capsys: pytest.CaptureFixture[str]) -> None:
    progress = bar("payments written", 10, unit="payment")
    progress.reach(6)
    progress.reach(4)  # a slower thread reporting an older count
    assert progress.n == 6
    progress.finish(10, note="done")
    assert progress.n == 10
