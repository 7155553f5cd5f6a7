"""The end-of-run checks: what must hold after any run, however many crashes.

Only this module reads both services' tables; the services never do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import Connection, text


@dataclass
class Report:
    payments: int = 0
    captured: int = 0
    refunded: int = 0
    events_applied: int = 0
    postings: int = 0
    debits_minor: int = 0
    credits_minor: int = 0
    violations: dict[str, int] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(self.violations.values())


CHECKS = {
    # every captured (or refunded, which was captured first) payment posted its capture once
    "captured payment without exactly one capture posting": """
        SELECT count(*) FROM payments.payment p
        WHERE p.status IN ('captured', 'refunded')
          AND (SELECT count(*) FROM ledger.entry e
               WHERE e.payment_id = p.id AND e.kind = 'capture') <> 2""",
    "refunded payment without exactly one refund posting": """
        SELECT count(*) FROM payments.payment p
        WHERE p.status = 'refunded'
          AND (SELECT count(*) FROM ledger.entry e
               WHERE e.payment_id = p.id AND e.kind = 'refund') <> 2""",
    "posting for a payment that never reached that state": """
        SELECT count(*) FROM ledger.entry e
        LEFT JOIN payments.payment p ON p.id = e.payment_id
        WHERE p.id IS NULL
           OR (e.kind = 'capture' AND p.status NOT IN ('captured', 'refunded'))
           OR (e.kind = 'refund' AND p.status <> 'refunded')""",
    "event applied twice": """
        SELECT count(*) - count(DISTINCT event_id) FROM ledger.applied_event""",
    "committed event never applied": """
        SELECT (SELECT coalesce(sum(version), 0) FROM payments.payment)
             - (SELECT count(*) FROM ledger.applied_event)""",
    "payment events applied out of commit order": """
        SELECT count(*) FROM (
            SELECT version, row_number() OVER (PARTITION BY payment_id ORDER BY id) AS nth
            FROM ledger.applied_event) s
        WHERE version <> nth""",
    "books do not balance (per currency)": """
        SELECT count(*) FROM (
            SELECT currency FROM ledger.entry GROUP BY currency
            HAVING sum(debit_minor) <> sum(credit_minor)) s""",
}


def check(conn: Connection) -> Report:
    report = Report()
    report.payments, report.captured, report.refunded = conn.execute(text(
        "SELECT count(*), count(*) FILTER (WHERE status IN ('captured', 'refunded')),"
        " count(*) FILTER (WHERE status = 'refunded') FROM payments.payment"
    )).one()
    report.events_applied = conn.execute(text("SELECT count(*) FROM ledger.applied_event")).scalar_one()
    report.postings, report.debits_minor, report.credits_minor = conn.execute(text(
        "SELECT count(*), coalesce(sum(debit_minor), 0), coalesce(sum(credit_minor), 0)"
        " FROM ledger.entry"
    )).one()
    for name, sql in CHECKS.items():
        report.violations[name] = int(conn.execute(text(sql)).scalar_one())
    row = conn.execute(text(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms),"
        "       percentile_cont(0.99) WITHIN GROUP (ORDER BY ms), max(ms)"
        " FROM (SELECT extract(epoch FROM applied_at - event_time) * 1000 AS ms"
        "       FROM ledger.applied_event) s"
    )).one()
    if row[0] is not None:
        report.latency_ms = {"p50": float(row[0]), "p99": float(row[1]), "max": float(row[2])}
    return report
