"""`make demo`: the payments system through the whole chain, with crashes.

    payment service --(one transaction: payment row + outbox row)--> PostgreSQL
    relay (python -m relay) --(CloudEvents, acks=all, idempotent)--> Kafka
    ledger (python -m examples.payments.ledger) --(inbox + postings, one transaction)--> PostgreSQL

It writes thousands of payments from several threads (create, a retried
create with the same idempotency key, authorise, capture, some refunds),
kills the relay and the ledger with SIGKILL at random (seeded) moments and
restarts them, waits until the ledger has applied every committed event,
then checks the invariants and prints the summary. Exit code 1 if any
invariant fails.

    python -m examples.payments.demo [--payments 2000] [--rate 50] [--workers 4] [--kills 2] [--seed 7]
                                     [--transport kafka|rabbitmq]

`--transport rabbitmq` (`make demo TRANSPORT=rabbitmq`) runs the same chain
over RabbitMQ: the relay's rabbitmq publisher and the ledger's `RabbitMQ()`
transport, at OUTBOX_RABBITMQ_URL (else the devstack's node).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time
from pathlib import Path

from examples.payments.system import Outcome, PaymentsSystem
from harness import devstack
from harness.devstack import REPO
from harness.scrape import quantile, scrape, value


def run(
    *,
    database_url: str,
    bootstrap_servers: str,
    payments: int = 2000,
    workers: int = 4,
    rate: float | None = 50,
    kills: int = 2,
    seed: int = 7,
    workdir: Path,
    timeout: float = 600,
    say: object = print,
    rabbitmq_url: str | None = None,
) -> tuple[Outcome, dict[str, int]]:
    """The whole chain once; returns the outcome and how often each process was SIGKILLed."""
    assert callable(say)
    system = PaymentsSystem(
        database_url=database_url, bootstrap_servers=bootstrap_servers, workdir=workdir,
        metrics=True,
        rabbitmq_url=rabbitmq_url,
    )
    say(f"schema: outbox tables at {system.prepare()}, example tables ready")
    if rabbitmq_url:
        say(f"rabbitmq: exchange {system.topic}, group {system.group}: 4 quorum queues")
    else:
        say(f"kafka: topic {system.topic} (4 partitions), consumer group {system.group}")
    system.start()
    say(f"relay and ledger running (logs in {workdir})")
    for name, url in system.metrics_urls.items():
        say(f"{name}: metrics at {url}/metrics, health at {url}/livez and {url}/readyz")

    rng = random.Random(seed)
    victims = (["relay", "ledger"] * kills)[:kills]
    rng.shuffle(victims)
    killed = {"relay": 0, "ledger": 0}
    writing_done = threading.Event()

    def chaos() -> None:
        for victim in victims:
            writing_done.wait(rng.uniform(0.5, 2.0))
            process = system.relays[0] if victim == "relay" else system.ledgers[0]
            process.kill()
            process.start()
            killed[victim] += 1

    chaos_thread = threading.Thread(target=chaos, daemon=True)
    try:
        chaos_thread.start()
        system.write_payments(payments, workers=workers, seed=seed, rate=rate)
        writing_done.set()
        chaos_thread.join()
        system.wait_until_applied(timeout=timeout)
        for line in read_back_metrics(system):
            say(line)
        exits = system.stop()
        if any(exits.values()):
            say(f"warning: exit codes {exits}")
        return system.outcome(), killed
    finally:
        system.stop()
        system.close()


def read_back_metrics(system: PaymentsSystem, *, timeout: float = 20) -> list[str]:
    """A few figures as Prometheus would scrape them from the relay's and the ledger's /metrics,
    not from the demo's own counters, so that the metrics are seen to be true."""
    relay, ledger = system.metrics_urls["relay-0"], system.metrics_urls["ledger-0"]
    committed = system.committed_events()
    # The backlog gauges are refreshed every few seconds: wait for the drained state.
    deadline = time.monotonic() + timeout
    seen = scrape(relay)
    while value(seen, "outbox_published_events") < committed and time.monotonic() < deadline:
        time.sleep(0.5)
        seen = scrape(relay)
    consumed = scrape(ledger)
    group = {"group": system.group, "topic": system.topic}

    def ms(q: float | None) -> str:
        return "-" if q is None else f"{q * 1000:.0f} ms"

    return [
        "read back from /metrics (counters since each process's last restart):",
        f"  relay  {relay}/metrics: outbox_published_events (m) {value(seen, 'outbox_published_events'):.0f}, "
        f"outbox_backlog_events (Q) {value(seen, 'outbox_backlog_events'):.0f}, "
        f"outbox_parked_events {value(seen, 'outbox_parked_events'):.0f}, "
        f"oldest unpublished {value(seen, 'outbox_oldest_unpublished_age_seconds'):.1f}s",
        f"         outbox_relay_published_total {value(seen, 'outbox_relay_published_total', topic=system.topic):.0f}, "
        f"commit->ack p50 {ms(quantile(seen, 'outbox_relay_commit_to_ack_seconds', 0.5, topic=system.topic))}, "
        f"p99 {ms(quantile(seen, 'outbox_relay_commit_to_ack_seconds', 0.99, topic=system.topic))}",
        f"  ledger {ledger}/metrics: outbox_consumer_applied_total "
        f"{value(consumed, 'outbox_consumer_applied_total', **group):.0f}, "
        f"duplicates {value(consumed, 'outbox_consumer_duplicates_total', **group):.0f}, "
        f"dead-lettered {value(consumed, 'outbox_consumer_dead_lettered_total', **group):.0f}, "
        f"commit->effect p50 {ms(quantile(consumed, 'outbox_consumer_commit_to_effect_seconds', 0.5, **group))}, "
        f"p99 {ms(quantile(consumed, 'outbox_consumer_commit_to_effect_seconds', 0.99, **group))}",
    ]


def print_summary(outcome: Outcome, killed: dict[str, int]) -> None:
    r = outcome.report
    duplicates = outcome.counters.get("duplicates", 0)
    lines = [
        "",
        "payments demo: summary",
        f"  payments committed          {r.payments:>10}  (captured {r.captured}, refunded {r.refunded})",
        f"  retried creates (same key)  {outcome.retried_creates:>10}  -> no second payment",
        f"  events committed            {outcome.committed_events:>10}",
        f"  events published            {outcome.published:>10}  (backlog {outcome.backlog}, parked {outcome.parked})",
        f"  events applied by ledger    {r.events_applied:>10}",
        f"  ledger postings             {r.postings:>10}",
        f"  debits = credits            {r.debits_minor:>10} = {r.credits_minor} (minor units)",
        f"  duplicates suppressed       {duplicates:>10}  (redeliveries the inbox skipped)",
        f"  SIGKILLs                    relay {killed['relay']}, ledger {killed['ledger']}",
        f"  elapsed                     {outcome.seconds:>9.1f}s",
    ]
    if r.latency_ms:
        lines.append(
            f"  commit -> ledger latency    p50 {r.latency_ms['p50']:.0f} ms, "
            f"p99 {r.latency_ms['p99']:.0f} ms, max {r.latency_ms['max']:.0f} ms"
            " (includes the restarts)"
        )
    lines.append("  invariants:")
    for name, count in r.violations.items():
        lines.append(f"    {'ok  ' if count == 0 else 'FAIL'} {name}: {count}")
    lines.append(f"  result: {'ALL INVARIANTS HOLD' if r.ok else 'INVARIANT VIOLATED'}")
    print("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m examples.payments.demo", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--payments", type=int, default=2000)
    parser.add_argument(
        "--rate", type=float, default=50,
        help="payments per second offered (about 3 events each); 0 = as fast as possible",
    )
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--kills", type=int, default=2, help="SIGKILLs of relay/ledger during the run")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--workdir", type=Path, default=REPO / ".devstack" / "demo")
    parser.add_argument("--transport", choices=("kafka", "rabbitmq"), default="kafka")
    args = parser.parse_args()
    found = devstack.addresses()  # OUTBOX_* variables, else `devstack/devstack env`
    rabbitmq_url = None
    if args.transport == "rabbitmq":
        rabbitmq_url = os.environ.get("OUTBOX_RABBITMQ_URL") or devstack.env()["OUTBOX_RABBITMQ_URL"]
    outcome, killed = run(
        database_url=found.database_url, bootstrap_servers=found.bootstrap_servers,
        payments=args.payments, workers=args.workers, kills=args.kills, seed=args.seed,
        rate=args.rate or None,
        workdir=args.workdir, rabbitmq_url=rabbitmq_url,
    )
    print_summary(outcome, killed)
    return 0 if outcome.report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
