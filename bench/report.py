"""Results: one row per figure, printed as a table and written as JSON and Markdown."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


@dataclass
class Row:
    """One figure. `value`/`limit` give the ratio; `result` is what a person reads."""

    measurement: str  # e.g. "1 write cost"
    case: str  # e.g. "publish, NOTIFY on"
    result: str  # e.g. "1,234 tx/s"
    value: float | None = None
    limit: float | None = None
    limit_case: str = ""  # what the limit is, e.g. "same transactions, no outbox"
    target: float | None = None  # minimum ratio the kit aims for
    note: str = ""
    lower_is_better: bool = False  # a cost (WAL, CPU): the ratio is limit / value

    @property
    def ratio(self) -> float | None:
        if self.value is None or self.limit is None or self.limit <= 0:
            return None
        if self.lower_is_better:
            return self.limit / self.value if self.value > 0 else None
        return self.value / self.limit

    @property
    def verdict(self) -> str:
        ratio = self.ratio
        if ratio is None or self.target is None:
            return ""
        return "ok" if ratio >= self.target else "MISSED"

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ratio"] = None if self.ratio is None else round(self.ratio, 3)
        data["verdict"] = self.verdict
        return data


@dataclass
class Section:
    """What one measurement module returns."""

    name: str
    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None


@dataclass
class Run:
    mode: str
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    command: str = ""
    machine: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rows(self) -> list[Row]:
        return [row for section in self.sections for row in section.rows]

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "started_at": self.started_at,
            "seconds": round(self.seconds, 1),
            "command": self.command,
            "machine": self.machine,
            "settings": self.settings,
            "notes": self.notes,
            "results": [row.as_dict() for row in self.rows],
            "sections": {
                s.name: {"seconds": round(s.seconds, 1), "error": s.error, "details": s.details}
                for s in self.sections
            },
        }


HEADER = ("#", "case", "kit", "limit (same run)", "ratio", "target", "")


def _cells(row: Row) -> tuple[str, ...]:
    ratio = row.ratio
    limit = ""
    if row.limit is not None:
        limit = f"{_num(row.limit)} {row.limit_case}".strip()
    elif row.limit_case:
        limit = row.limit_case
    return (
        row.measurement,
        row.case,
        row.result,
        limit,
        "" if ratio is None else f"{ratio:.2f}",
        "" if row.target is None else f">= {row.target:.2f}",
        row.verdict,
    )


def _num(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.2f}"


def text_table(rows: Sequence[Row]) -> str:
    """A plain table for the terminal."""
    lines = [HEADER, *(_cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def markdown(run: Run) -> str:
    m = run.machine
    pkgs = m.get("packages", {})
    pg = m.get("postgres", {})
    kafka = m.get("kafka", {})
    lines = [
        f"# outbox kit benchmark ({run.mode})",
        "",
        f"{run.started_at}, {run.seconds / 60:.1f} min, `{run.command}`, kit at "
        f"{m.get('kit_revision')}",
        "",
        f"Machine: {m.get('cores')} cores ({m.get('cpu_model')}), {m.get('memory_gib')} GiB; "
        f"Python {m.get('python')}; PostgreSQL {pg.get('server_version')} "
        f"(shared_buffers {pg.get('shared_buffers')}, synchronous_commit {pg.get('synchronous_commit')}, "
        f"fsync {pg.get('fsync')}); Kafka {kafka.get('broker_version')} "
        f"(ApiVersions: {kafka.get('api_version_seen_by_kafka_python')}), one broker, "
        f"{kafka.get('partitions_per_topic')} partitions per topic; "
        + ", ".join(f"{k} {v or 'not installed'}" for k, v in pkgs.items()),
        "",
        "| " + " | ".join(HEADER[:-1]) + " | |",
        "|" + "---|" * len(HEADER),
    ]
    for row in run.rows:
        lines.append("| " + " | ".join(c.replace("|", "/") for c in _cells(row)) + " |")
    notes = [f"- {r.measurement} {r.case}: {r.note}" for r in run.rows if r.note]
    errors = [f"- {s.name}: {s.error}" for s in run.sections if s.error]
    if notes or run.notes:
        lines += ["", "Notes:", "", *notes, *(f"- {n}" for n in run.notes)]
    if errors:
        lines += ["", "Errors:", "", *errors]
    lines += ["", "Settings: see `settings` in the JSON file next to this one.", ""]
    return "\n".join(lines)


def write(run: Run, directory: Path, stems: Sequence[str]) -> list[Path]:
    """<directory>/<stem>.json and .md for each stem (e.g. "quick", "latest")."""
    directory.mkdir(parents=True, exist_ok=True)
    data = json.dumps(run.as_dict(), indent=2, default=str) + "\n"
    md = markdown(run)
    written = []
    for stem in stems:
        (directory / f"{stem}.json").write_text(data)
        (directory / f"{stem}.md").write_text(md)
        written += [directory / f"{stem}.json", directory / f"{stem}.md"]
    return written
