"""Optional profiles (`--profile`): pyinstrument around a measurement's timed loop.

Each profiled loop is written as text to bench/results/profiles/<label>.txt.
Off by default (a profiler slows the loop it watches); pyinstrument is not a
dependency of the kit: `.venv/bin/pip install pyinstrument`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DIRECTORY = Path(__file__).resolve().parent / "results" / "profiles"
_enabled = False


def enable() -> None:
    global _enabled
    try:
        import pyinstrument  # noqa: F401
    except ImportError:
        raise SystemExit(
            "bench: --profile needs pyinstrument: .venv/bin/pip install pyinstrument"
        ) from None
    _enabled = True


@contextmanager
def profiled(label: str) -> Iterator[None]:
    """Profile the block (this thread) if profiling is enabled; a no-op otherwise."""
    if not _enabled:
        yield
        return
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.001)
    profiler.start()
    try:
        yield
    finally:
        profiler.stop()
        DIRECTORY.mkdir(parents=True, exist_ok=True)
        name = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
        (DIRECTORY / f"{name}.txt").write_text(
            profiler.output_text(unicode=False, color=False, show_all=False)
        )
