"""The payments system as processes: relays, ledgers, payment writers, and the
levers a fault controller pulls. The demo and the fault-injection suite both
drive this; neither knows how a process is started or killed.

    payment writers (threads of this process) → PostgreSQL
    N x `python -m relay`                      → Kafka
    M x `python -m examples.payments.ledger`   → PostgreSQL (ledger schema + inbox)
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import psycopg
from kafka.admin import KafkaAdminClient, NewTopic
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from tenacity import retry, retry_if_exception, stop_after_delay, wait_fixed

from examples.payments.invariants import Report, check
from examples.payments.schema import applied_event, create_tables, reset_tables
from examples.payments.service import PaymentService, TransitionError
from harness import procs
from harness.procs import Child
from harness.progress import bar as _bar
from harness.scrape import free_port
from outbox import migrate
from outbox.stats import outbox_stats

T = TypeVar("T")


class Ledger(Child):
    """A ledger process; each start writes its consumer counters to a file of its own."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        super().__init__(name, argv, env, log=log)
        self.stats_files: list[Path] = []

    def argv_for_start(self) -> list[str]:
        path = self.log.with_name(f"{self.name}-stats-{self.starts}.json")
        self.stats_files.append(path)
        return [*self.argv, "--stats-file", str(path)]

    def counters(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for path in self.stats_files:
            if path.exists():
                for name, value in json.loads(path.read_text()).items():
                    totals[name] = totals.get(name, 0) + int(value)
        return totals


@dataclass
class Outcome:
    report: Report
    seconds: float
    committed_events: int
    published: int
    backlog: int
    parked: int
    retried_creates: int
    counters: dict[str, int] = field(default_factory=dict)

    @property
    def lost(self) -> int:
        return self.report.violations.get("committed event never applied", 0)


class PaymentsSystem:
    def __init__(
        self,
        *,
        database_url: str,
        bootstrap_servers: str,
        workdir: Path,
        relays: int = 1,
        ledgers: int = 1,
        partitions: int = 4,
        replication: int = 1,
        relay_env: dict[str, str] | None = None,
        metrics: bool = False,
        rabbitmq_url: str | None = None,
    ) -> None:
        """`metrics`: each relay and ledger serves /metrics, /livez and /readyz on a free
        127.0.0.1 port of its own (`metrics_urls`, by process name).
        `rabbitmq_url`: the same system over RabbitMQ (relay publisher and ledgers),
        4 quorum queues for the ledger group; None: Kafka."""
        self.rabbitmq_url = rabbitmq_url
        if rabbitmq_url is not None:
            relay_env = {**(relay_env or {}), "OUTBOX_RELAY_PUBLISHER": "rabbitmq",
                         "OUTBOX_RABBITMQ_URL": rabbitmq_url}
        self.database_url = database_url
        self.bootstrap_servers = bootstrap_servers
        self.workdir = workdir
        run_id = uuid.uuid4().hex[:8]
        self.topic, self.group = f"payments-{run_id}", f"ledger-{run_id}"
        self.partitions, self.replication = partitions, replication
        workdir.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = create_engine(database_url, pool_size=8, max_overflow=8,
                                            pool_pre_ping=True)
        env = procs.child_env(database_url, bootstrap_servers, relay_env)
        names = [*(f"relay-{i}" for i in range(relays)), *(f"ledger-{i}" for i in range(ledgers))]
        ports = {name: free_port() for name in names} if metrics else {}
        self.metrics_urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        self.relays = [
            procs.relay(f"relay-{i}", {**env, **({"OUTBOX_RELAY_METRICS_PORT": str(ports[f"relay-{i}"])}
                                                 if metrics else {})},
                        log=workdir / f"relay-{i}.log")
            for i in range(relays)
        ]
        ledger_argv = [sys.executable, "-m", "examples.payments.ledger",
                       "--topic", self.topic, "--group", self.group,
                       *(["--transport", "rabbitmq"] if rabbitmq_url else [])]
        self.ledgers = [
            Ledger(f"ledger-{i}", [*ledger_argv, "--instance-id", f"ledger-{i}",
                                   *(["--metrics-port", str(ports[f"ledger-{i}"])] if metrics else [])],
                   env, workdir / f"ledger-{i}.log")
            for i in range(ledgers)
        ]
        self.service = PaymentService(self.engine, topic=self.topic)
        self.retried_creates = 0
        self._started = 0.0

    # -- lifecycle ------------------------------------------------------------

    def prepare(self) -> str:
        """Schema migrated, example tables empty, a fresh topic. Returns the schema revision."""
        migrate.upgrade(self.database_url)
        create_tables(self.engine)
        reset_tables(self.engine)
        if self.rabbitmq_url is not None:
            self._declare_rabbitmq()
            return migrate.current(self.database_url) or "?"
        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap_servers)
        try:
            admin.create_topics([NewTopic(self.topic, self.partitions, self.replication)])
        finally:
            admin.close()
        return migrate.current(self.database_url) or "?"

    def start(self) -> None:
        self._started = time.monotonic()
        for p in [*self.relays, *self.ledgers]:
            p.start()

    def _declare_rabbitmq(self) -> None:
        import pika

        from outbox.rabbitmq_topology import Topology, declare
        from outbox.rabbitmq_wire import connection_parameters

        assert self.rabbitmq_url is not None
        connection = pika.BlockingConnection(connection_parameters(self.rabbitmq_url))
        try:
            declare(connection.channel(), Topology(topic=self.topic, group=self.group, queues=self.partitions))
        finally:
            connection.close()

    def _wait_ready_rabbitmq(self, timeout: float) -> None:
        """Until every shard is leased and every queue of the ledger group has its active consumer."""
        import pika

        from outbox.rabbitmq_topology import Topology
        from outbox.rabbitmq_wire import connection_parameters
        from outbox.schema import SHARDS

        assert self.rabbitmq_url is not None
        queues = Topology(topic=self.topic, group=self.group, queues=self.partitions).queue_names
        connection = pika.BlockingConnection(connection_parameters(self.rabbitmq_url))
        deadline = time.monotonic() + timeout
        try:
            channel = connection.channel()
            while time.monotonic() < deadline:
                with self.engine.connect() as conn:
                    leased = conn.execute(text(
                        "SELECT count(*) FROM outbox_relay_lease WHERE expires_at > now()"
                    )).scalar_one()
                consumers = [channel.queue_declare(q, passive=True).method.consumer_count for q in queues]
                # A queue counts its active consumer only (the others wait, unseen here).
                if leased == SHARDS and min(consumers) >= 1:
                    return
                time.sleep(0.3)
        finally:
            connection.close()
        raise TimeoutError(f"relays and ledgers not ready within {timeout}s")

    def wait_ready(self, *, timeout: float = 60) -> None:
        """Until every shard is leased to a live relay and every ledger has joined its group."""
        from outbox.schema import SHARDS

        if self.rabbitmq_url is not None:
            self._wait_ready_rabbitmq(timeout)
            return

        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap_servers)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                with self.engine.connect() as conn:
                    leased = conn.execute(text(
                        "SELECT count(*) FROM outbox_relay_lease WHERE expires_at > now()"
                    )).scalar_one()
                try:
                    group = admin.describe_groups([self.group]).get(self.group, {})
                except Exception:  # coordinator not ready yet
                    group = {}
                stable = group.get("group_state") == "Stable"
                members = len(group.get("members") or []) if stable else 0
                if leased == SHARDS and members == len(self.ledgers):
                    return
                time.sleep(0.3)
        finally:
            admin.close()
        raise TimeoutError(f"relays and ledgers not ready within {timeout}s")

    def stop(self) -> dict[str, int]:
        return {p.name: p.stop().returncode for p in [*self.relays, *self.ledgers]}

    # -- load -----------------------------------------------------------------

    def write_payments(
        self, count: int, *, workers: int = 4, seed: int = 7, rate: float | None = None,
        progress: bool = True,
    ) -> None:
        """`count` payments from `workers` threads; `rate` payments/s in total, or as fast
        as possible. Each: create (5% retried with the same idempotency key),
        authorise (95%), capture (95% of those), refund (10% of captures)."""
        bar = _bar("payments written", count, unit="payment") if progress else None
        lock = threading.Lock()
        done = [0]
        errors: list[BaseException] = []
        interval = workers / rate if rate else 0.0

        def work(worker: int) -> None:
            rng = random.Random(seed * 1000 + worker)
            next_at = time.monotonic()
            for n in range(worker, count, workers):
                if interval:
                    next_at += interval
                    time.sleep(max(0.0, next_at - time.monotonic()))
                try:
                    retried = self._one_payment(rng, f"order-{seed}-{n}")
                except BaseException as exc:
                    errors.append(exc)
                    return
                with lock:
                    done[0] += 1
                    self.retried_creates += int(retried)
                    if bar:
                        bar.reach(done[0])

        threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if bar:
            bar.finish(done[0])
        if errors:
            raise errors[0]

    def _one_payment(self, rng: random.Random, key: str) -> bool:
        service = self.service
        p = _retry_db(lambda: service.create(
            idempotency_key=key, merchant=f"merchant-{rng.randint(0, 16)}",
            amount_minor=rng.randint(100, 500_000),
        ))
        retried = rng.random() < 0.05
        if retried:  # the client timed out and retried: no second payment
            again = _retry_db(lambda: service.create(
                idempotency_key=key, merchant="x", amount_minor=1))
            assert again.id == p.id
        if rng.random() < 0.95:
            _move(lambda: service.authorise(p.id), already="authorised")
            if rng.random() < 0.95:
                _move(lambda: service.capture(p.id), already="captured")
                if rng.random() < 0.1:
                    _move(lambda: service.refund(p.id), already="refunded")
        return retried

    # -- observation ----------------------------------------------------------

    def committed_events(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(
                text("SELECT coalesce(sum(version), 0) FROM payments.payment")).scalar_one())

    def applied(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(applied_event)).scalar_one())

    def wait_until_applied(self, *, timeout: float, progress: bool = True) -> bool:
        """Until the ledger applied every committed event (True) or `timeout` (False)."""
        committed = self.committed_events()
        deadline = time.monotonic() + timeout
        applied = _retry_db(self.applied)
        # Most events were applied while the payments were being written: the bar
        # starts from them, so its rate counts only what it saw being applied.
        bar = _bar("ledger applied", committed, initial=applied, unit="event") if progress else None
        while applied < committed and time.monotonic() < deadline:
            time.sleep(0.2)
            applied = _retry_db(self.applied)
            if bar:
                bar.reach(applied)
        if bar:
            bar.finish(applied)
        return applied >= committed

    def outcome(self) -> Outcome:
        with self.engine.connect() as conn:
            report = check(conn)
            s = outbox_stats(conn)
        counters: dict[str, int] = {}
        for ledger in self.ledgers:
            for name, value in ledger.counters().items():
                counters[name] = counters.get(name, 0) + value
        return Outcome(
            report=report, seconds=time.monotonic() - self._started,
            committed_events=self.committed_events(), published=s.published,
            backlog=s.backlog, parked=s.parked, retried_creates=self.retried_creates,
            counters=counters,
        )

    def recovery_after(self, moment: float) -> float | None:
        """Seconds from `moment` (time.time()) until the ledger applied the first event
        committed after it: how long the whole chain took to recover from a fault then."""
        with self.engine.connect() as conn:
            row = conn.execute(text(
                "SELECT extract(epoch FROM min(applied_at)) FROM ledger.applied_event"
                " WHERE event_time >= to_timestamp(:t)"
            ), {"t": moment}).scalar_one()
        return None if row is None else float(row) - moment

    def close(self) -> None:
        self.engine.dispose()
        if self.rabbitmq_url is not None:
            self._delete_rabbitmq()

    def _delete_rabbitmq(self) -> None:
        """The run's exchanges and queues: every quorum queue left behind slows the node's next boot."""
        import pika

        from outbox.rabbitmq_topology import Topology
        from outbox.rabbitmq_wire import connection_parameters

        assert self.rabbitmq_url is not None
        topology = Topology(topic=self.topic, group=self.group, queues=self.partitions)
        try:
            connection = pika.BlockingConnection(connection_parameters(self.rabbitmq_url))
        except Exception:  # the broker is gone: nothing to tidy
            return
        try:
            channel = connection.channel()
            for queue in [*topology.queue_names, topology.dead_letter_queue]:
                channel.queue_delete(queue)
            for exchange in (topology.group_exchange, topology.dead_letter_exchange, topology.exchange):
                channel.exchange_delete(exchange)
        finally:
            connection.close()


def _connection_lost(exc: BaseException) -> bool:
    """The errors a database restart or failover produces, told by type: a
    dropped or refused connection, an administrator's shutdown, a server still
    starting. Anything else (a constraint, a bug) is not retried."""
    if isinstance(exc, DBAPIError):
        return exc.connection_invalidated or isinstance(exc, OperationalError | InterfaceError)
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)


@retry(retry=retry_if_exception(_connection_lost), wait=wait_fixed(0.2),
       stop=stop_after_delay(60), reraise=True)
def _retry_db(action: Callable[[], T]) -> T:
    """Run a payment API call the way a client would during a database restart:
    again every 0.2 s while the connection is lost, for up to a minute."""
    return action()


def _move(action: Callable[[], object], *, already: str) -> None:
    """A state move, retried like any call. If its first attempt committed just
    before the connection dropped, the retry finds the payment `already` there:
    that counts as done, not as an error."""
    try:
        _retry_db(action)
    except TransitionError as exc:
        if exc.status != already:
            raise
