"""The progress bar: the payments example's tiny stderr bar (no dependency)."""

from __future__ import annotations

from examples.payments.progress import Progress

__all__ = ["Progress"]
