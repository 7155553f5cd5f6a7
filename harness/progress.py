"""Progress bars for the demo and the benchmark: tqdm, on stderr.

A bar's rate is the items done since *that bar* started over the time since
it started (`smoothing=0`, and `initial` for what was done before it).
The hand-written bar this replaces divided a ledger's whole count, most of it
applied while the payments were still being written, by the moments since
its own start, and printed 4,000,263/s.

On a terminal the bar is redrawn in place; in a log (CI) it writes a line
every few seconds instead of flooding it.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from tqdm import tqdm  # type: ignore[import-untyped]  # no stubs; dev tooling only


class Bar(tqdm):  # type: ignore[misc]  # tqdm is untyped
    """A tqdm bar fed absolute counts, which is what the callers have (often from
    several writer threads at once)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._counting = threading.Lock()

    def reach(self, done: int, *, note: str = "") -> None:
        """The count is now `done` (a smaller one is ignored); `note` follows the rate."""
        with self._counting:
            if note:
                self.set_postfix_str(note, refresh=False)
            if done > self.n:
                self.update(done - self.n)

    def finish(self, done: int, *, note: str = "") -> None:
        self.reach(done, note=note)
        self.close()


_FORMAT = "{desc:<24}{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]"


def bar(label: str, total: int, *, initial: int = 0, unit: str = "it") -> Bar:
    """A bar for `total` items of which `initial` were done before it started."""
    terminal = sys.stderr.isatty()
    return Bar(
        # The space keeps "99 event/s" readable; tqdm glues unit and rate.
        desc=label, total=total, initial=initial, unit=f" {unit}", file=sys.stderr, smoothing=0,
        mininterval=0.1 if terminal else 5.0, dynamic_ncols=terminal,
        ncols=None if terminal else 100, bar_format=_FORMAT, leave=True,
    )
