"""The fault-injection suite over RabbitMQ: the payments system with 3 relays and 2 ledgers
(one active consumer per queue, the other waiting) on the devstack's RabbitMQ node,
while the same seeded controller as `test_faults.py` breaks things underneath:

    kill-relay, kill-ledger, pause-relay, pause-ledger, cut-connections   as on Kafka
    kill-rabbitmq        SIGKILL the RabbitMQ node, start it again
    close-rabbitmq       `rabbitmqctl close_all_connections`: every client cut off at once

PostgreSQL is not restarted here (that fault is the Kafka suite's); the
invariant table and its assertions are the same. The load lasts
`OUTBOX_FAULTS_SECONDS`, at least 150 s (seed `OUTBOX_FAULTS_SEED`).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from examples.payments.system import PaymentsSystem
from tests import services
from tests.integration.test_faults import (
    LEASE_TTL,
    SECONDS,
    SEED,
    Controller,
    Fault,
    check_and_report,
    run_under_faults,
)
from tests.rabbitmq_helpers import close_all_connections

pytestmark = [pytest.mark.integration, pytest.mark.faults]

RELAYS, LEDGERS = 3, 2
# A RabbitMQ node takes 10-40 s to boot here: load long enough for every kind of
# fault to land while payments are still written (recovery is measured on new ones).
LOAD_SECONDS = max(SECONDS, 150.0)


class RabbitMQController(Controller):
    KINDS = ("kill-relay", "kill-ledger", "pause-relay", "pause-ledger", "kill-rabbitmq",
             "close-rabbitmq", "cut-connections")

    def __init__(self, system: PaymentsSystem, rng: random.Random, database_url: str, url: str) -> None:
        super().__init__(system, rng, database_url)
        self.url = url

    def _inject(self, kind: str) -> Fault:
        at = time.time()
        if kind == "kill-rabbitmq":
            services.restart_rabbitmq()
        elif kind == "close-rabbitmq":
            close_all_connections(self.url)
        else:
            return super()._inject(kind)
        return self._record(Fault(kind, "rabbitmq", at))


def test_payments_system_over_rabbitmq_under_injected_faults(
    database_url: str, rabbitmq_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    system = PaymentsSystem(
        database_url=database_url, bootstrap_servers="unused:9", workdir=tmp_path,
        relays=RELAYS, ledgers=LEDGERS, partitions=4, rabbitmq_url=rabbitmq_url,
        relay_env={"OUTBOX_RELAY_LEASE_TTL": str(LEASE_TTL), "OUTBOX_RELAY_BACKOFF_MAX": "2"},
    )
    controller = RabbitMQController(system, random.Random(SEED), database_url, rabbitmq_url)
    outcome = run_under_faults(system, controller, seconds=LOAD_SECONDS, ready_timeout=90)
    check_and_report(outcome, controller, capsys, "faults-rabbitmq-report.md", seconds=LOAD_SECONDS,
                     brokers=f"{RELAYS} / {LEDGERS} / 1 RabbitMQ node (4 quorum queues)")
