"""A progress bar on stderr, without a dependency: redrawn in place on a
terminal, one line every few seconds in a log (CI)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, label: str, total: int, *, width: int = 32) -> None:
        self.label = label
        self.total = max(total, 1)
        self.width = width
        self.started = time.monotonic()
        self._last_draw = 0.0
        self._tty = sys.stderr.isatty()

    def update(self, done: int, *, note: str = "") -> None:
        now = time.monotonic()
        if now - self._last_draw < (0.1 if self._tty else 5.0) and done < self.total:
            return
        self._last_draw = now
        filled = int(self.width * min(done, self.total) / self.total)
        rate = done / max(now - self.started, 1e-9)
        line = (
            f"{self.label:<22} [{'#' * filled}{'.' * (self.width - filled)}] "
            f"{done}/{self.total} {rate:,.0f}/s {note}"
        )
        if self._tty:
            sys.stderr.write("\r" + line.ljust(100))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self, done: int, *, note: str = "") -> None:
        self._last_draw = 0.0
        self.update(done, note=note)
        if self._tty:
            sys.stderr.write("\n")
