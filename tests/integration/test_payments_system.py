"""The payments reference system end to end, with the relay and the ledger
consumer each SIGKILLed several times at random (seeded) moments."""

from __future__ import annotations

from pathlib import Path

import pytest

from examples.payments import demo

pytestmark = pytest.mark.integration


def test_payments_system_survives_sigkills_with_every_invariant_holding(
    database_url: str, bootstrap_servers: str, tmp_path: Path
) -> None:
    said: list[str] = []
    outcome, killed = demo.run(
        database_url=database_url, bootstrap_servers=bootstrap_servers,
        payments=400, workers=4, rate=None, kills=6, seed=11, workdir=tmp_path, timeout=180,
        say=said.append,
    )
    assert killed == {"relay": 3, "ledger": 3}
    report = outcome.report
    assert report.violations == dict.fromkeys(report.violations, 0), report.violations
    assert report.payments == 400
    assert report.events_applied == outcome.committed_events == outcome.published
    assert report.debits_minor == report.credits_minor
    assert outcome.backlog == 0 and outcome.parked == 0
    # The figures read back from the relay's /metrics agree with the database.
    assert any(f"outbox_published_events (m) {outcome.published}," in line for line in said), said
    assert any("outbox_backlog_events (Q) 0," in line for line in said), said
