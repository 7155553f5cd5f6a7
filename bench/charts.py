"""PNG charts next to the tables: throughput per case against its limit, and the latency distribution.

Made from the run's JSON (`Run.as_dict()`), so a chart can be redrawn from
any results file: `python -m bench.charts bench/results/quick.json`.
matplotlib is a dev dependency; without it the benchmark writes its tables
and says that it drew no charts.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

UNITS = ("ev/s", "msg/s", "tx/s")


def write_charts(run: dict[str, Any], directory: Path, stems: Sequence[str]) -> list[Path]:
    """<stem>-throughput.png and <stem>-latency.png (when the run has those figures)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib is not installed, no charts drawn (pip install -e '.[dev]')",
              file=sys.stderr)
        return []
    written: list[Path] = []
    title = f"outbox kit {run.get('mode')}, kit at {run.get('machine', {}).get('kit_revision')}"
    figures = [("throughput", _throughput(plt, run, title)), ("latency", _latency(plt, run, title))]
    for name, figure in figures:
        if figure is None:
            continue
        for stem in stems:
            path = directory / f"{stem}-{name}.png"
            figure.savefig(path, dpi=110, bbox_inches="tight")
            written.append(path)
        plt.close(figure)
    return written


def _throughput(plt: Any, run: dict[str, Any], title: str) -> Any:
    rows = [r for r in run.get("results", [])
            if r.get("value") and r.get("limit") and any(u in r.get("result", "") for u in UNITS)]
    if not rows:
        return None
    figure, axes = plt.subplots(figsize=(10, 0.6 * len(rows) + 1.5))
    labels = [_wrap(f"{r['measurement'].split(' ', 1)[0]}. {r['case']}") for r in rows]
    positions = list(range(len(rows)))
    axes.barh(positions, [r["ratio"] for r in rows], height=0.6,
              color=["#d9822b" if r.get("verdict") == "MISSED" else "#2a7ab0" for r in rows])
    for p, r in zip(positions, rows, strict=True):
        unit = next(u for u in UNITS if u in r["result"])
        axes.text(min(r["ratio"], 1.0) + 0.01, p,
                  f"{r['ratio']:.2f}: {r['value']:,.0f} of {r['limit']:,.0f} {unit}", va="center", fontsize=8)
        if r.get("target"):
            axes.plot([r["target"]] * 2, [p - 0.35, p + 0.35], color="black", linewidth=1.5)
    axes.axvline(1.0, color="#888888", linestyle="--", linewidth=1)
    axes.set_yticks(positions, labels, fontsize=8)
    axes.invert_yaxis()
    axes.set_xlim(0, max(1.45, max(r["ratio"] for r in rows) + 0.45))
    axes.set_xlabel("share of the limit measured in the same run (1.0 = the limit; black tick = target; "
                    "orange = target missed)", fontsize=8)
    axes.set_title(f"Throughput against its limit: {title}", fontsize=10)
    return figure


def _latency(plt: Any, run: dict[str, Any], title: str) -> Any:
    cases = [c for s in run.get("sections", {}).values()
             for c in (s.get("details") or {}).get("cases", []) if c.get("distribution_ms")]
    if not cases:
        return None
    figure, axes = plt.subplots(figsize=(9, 4.5))
    for number, case in enumerate(cases):
        label = f"{case['offered_per_s']:,} ev/s offered, {case['mode']}"
        for key, style in (("commit_to_effect", "-"), ("commit_to_kafka", "--")):
            points = case["distribution_ms"].get(key)
            if points:
                quantiles = [float(q) for q in points]
                axes.plot([points[q] for q in points], quantiles, style, color=f"C{number}",
                          label=f"{label}: {key.replace('_', ' ')}")
    axes.set_xscale("log")
    axes.set_xlabel("milliseconds after COMMIT returned (log scale)")
    axes.set_ylabel("share of events")
    axes.set_ylim(0, 1.0)
    axes.grid(True, which="both", alpha=0.3)
    axes.set_title(f"Latency distribution: {title}", fontsize=10)
    axes.legend(fontsize=7, loc="lower right")
    return figure


def _wrap(text: str, width: int = 48) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line])


def main(argv: Sequence[str] | None = None) -> int:
    paths = [Path(p) for p in (sys.argv[1:] if argv is None else argv)]
    if not paths:
        print("usage: python -m bench.charts RESULTS.json [...]", file=sys.stderr)
        return 2
    for path in paths:
        for written in write_charts(json.loads(path.read_text()), path.parent, [path.stem]):
            print(f"wrote {written}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
