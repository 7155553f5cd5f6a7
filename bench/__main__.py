"""`python -m bench [--quick]`: every measurement, one table, results in bench/results/.

    make bench-quick          # the devstack server, database outbox_bench (created once)
    .venv/bin/python -m bench --quick --database-url postgresql+psycopg://USER:PASSWORD@HOST:PORT/outbox_bench
    .venv/bin/python -m bench --only relay,consumer --relay-events 200000

`main` parses and dispatches; each measurement is one module with a
`run(env, sizes) -> Section`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import (
    backlog_scale,
    batch_size,
    charts,
    consumer_throughput,
    latency,
    profiling,
    relay_throughput,
    scale_out,
    services,
    steady_cpu,
    wal,
    write_cost,
)
from bench.env import BenchEnv
from bench.machine import describe
from bench.report import Run, Section, text_table, write
from bench.settings import FULL, QUICK, Sizes
from harness import devstack

MEASUREMENTS: dict[str, Callable[[BenchEnv, Sizes], Section]] = {
    "write": write_cost.run,
    "relay": relay_throughput.run,
    "batch": batch_size.run,
    "cpu": steady_cpu.run,
    "wal": wal.run,
    "backlog": backlog_scale.run,
    "latency": latency.run,
    "consumer": consumer_throughput.run,
    "scaleout": scale_out.run,
}
RESULTS = Path(__file__).resolve().parent / "results"
ATTEMPTS = 3  # a measurement that saw a service restart is run again, up to this often


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    # kafka-python logs every reconnect; a restarted broker is reported by the runner.
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    sizes = _sizes(args)
    chosen = _chosen(args)
    if args.profile:
        profiling.enable()
    if args.database_url and args.bootstrap_servers:
        env = BenchEnv(database_url=args.database_url, bootstrap_servers=args.bootstrap_servers)
    else:
        found = devstack.addresses()  # OUTBOX_* variables, else `devstack/devstack env`
        env = BenchEnv(database_url=args.database_url or found.database_url,
                       bootstrap_servers=args.bootstrap_servers or found.bootstrap_servers)
    try:
        services.wait_until_up(env, timeout=20)
    except RuntimeError as exc:
        print(f"bench: {exc} (start them with: devstack/devstack up)", file=sys.stderr)
        return 2
    env.check_database_is_ours()
    from outbox import migrate

    migrate.upgrade(env.database_url)
    env.reset()

    run = Run(mode=sizes.mode, command=_command(argv))
    run.machine = describe(env)
    run.settings = _settings(sizes, env)
    started = time.perf_counter()
    print(f"bench ({sizes.mode}): {', '.join(chosen)} against database {env.database_name!r} "
          f"and Kafka {env.bootstrap_servers}", file=sys.stderr)
    try:
        for name in chosen:
            run.sections.append(_measure(name, MEASUREMENTS[name], env, sizes))
            print(text_table(run.sections[-1].rows), file=sys.stderr)
    except KeyboardInterrupt:
        run.notes.append("interrupted")
    finally:
        env.delete_topics()
        run.seconds = time.perf_counter() - started
    print()
    print(text_table(run.rows))
    if not args.no_write:
        stems = [sizes.mode, "latest"] if set(chosen) == set(MEASUREMENTS) else [f"{sizes.mode}-partial"]
        for path in write(run, Path(args.output_dir), stems):
            print(f"wrote {path}", file=sys.stderr)
        for path in charts.write_charts(run.as_dict(), Path(args.output_dir), stems):
            print(f"wrote {path}", file=sys.stderr)
    return 1 if any(s.error for s in run.sections) else 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="How close the kit comes to the limits of PostgreSQL and Kafka on this machine.",
    )
    p.add_argument("--quick", action="store_true", help="smoke run, about 3 minutes")
    p.add_argument("--database-url",
                   help="default: $OUTBOX_DATABASE_URL, else the devstack's; use a database of its "
                        "own (the benchmark truncates the kit's tables)")
    p.add_argument("--bootstrap-servers", help="default: $OUTBOX_KAFKA_BOOTSTRAP_SERVERS, else the devstack's")
    p.add_argument("--only", help=f"comma-separated subset of: {','.join(MEASUREMENTS)}")
    p.add_argument("--skip", help="comma-separated measurements to leave out")
    p.add_argument("--backlog-sizes", help="rows in the table for measurement 3, e.g. 10000,1000000")
    p.add_argument("--backlog-measured", type=int, help="events timed per backlog size")
    p.add_argument("--relay-events", type=int, help="backlog drained in measurement 2")
    p.add_argument("--relay-repeats", type=int,
                   help="runs of each measurement-2 case, interleaved with the raw ones (best reported)")
    p.add_argument("--steady-seconds", type=float, help="length of the steady run (3b)")
    p.add_argument("--latency-loads",
                   help="measurement 4's loads as RATE/PER_TX/SECONDS, comma-separated, "
                        "e.g. 500/1/30,5000/10/10 (the full run's)")
    p.add_argument("--profile", action="store_true",
                   help="pyinstrument profiles of the relay and consumer loops in results/profiles/")
    p.add_argument("--output-dir", default=str(RESULTS), help="default: bench/results")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    return p


def _sizes(args: argparse.Namespace) -> Sizes:
    sizes = QUICK if args.quick else FULL
    changes: dict[str, Any] = {}
    if args.backlog_sizes:
        changes["backlog_sizes"] = tuple(int(v.replace("_", "")) for v in args.backlog_sizes.split(","))
    if args.backlog_measured:
        changes["backlog_measured"] = args.backlog_measured
    if args.relay_events:
        changes["relay_events"] = args.relay_events
    if args.relay_repeats:
        changes["relay_repeats"] = args.relay_repeats
    if args.steady_seconds:
        changes["steady_seconds"] = args.steady_seconds
    if args.latency_loads:
        changes["latency_loads"] = tuple(_latency_load(v) for v in args.latency_loads.split(","))
    return dataclasses.replace(sizes, **changes) if changes else sizes


def _latency_load(value: str) -> tuple[int, int, float]:
    try:
        rate, per_tx, seconds = value.strip().split("/")
        load = (int(rate), int(per_tx), float(seconds))
    except ValueError:
        raise SystemExit(f"bench: --latency-loads: {value!r} is not RATE/PER_TX/SECONDS, "
                         "e.g. 500/1/30") from None
    if min(load) <= 0:
        raise SystemExit(f"bench: --latency-loads: {value!r} needs positive numbers")
    return load


def _chosen(args: argparse.Namespace) -> list[str]:
    def names(value: str | None) -> list[str]:
        items = [v.strip() for v in (value or "").split(",") if v.strip()]
        unknown = [v for v in items if v not in MEASUREMENTS]
        if unknown:
            raise SystemExit(f"bench: unknown measurement {unknown[0]!r}; choose from {', '.join(MEASUREMENTS)}")
        return items

    only, skip = names(args.only), names(args.skip)
    return [n for n in MEASUREMENTS if (not only or n in only) and n not in skip]


def _measure(name: str, fn: Callable[[BenchEnv, Sizes], Section], env: BenchEnv,
             sizes: Sizes) -> Section:
    """Run one measurement; again if PostgreSQL or Kafka restarted meanwhile."""
    restarts: list[str] = []
    for attempt in range(1, ATTEMPTS + 1):
        before = services.fingerprint(env)
        started = time.perf_counter()
        error: str | None = None
        try:
            section = fn(env, sizes)
        except Exception as exc:
            error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            traceback.print_exc()
            section = Section(name)
        section.seconds = time.perf_counter() - started
        after = services.fingerprint(env)
        if before == after:
            section.error = error
            if restarts:
                section.details["rerun_after_service_restart"] = restarts
            return section
        restarts.append(f"attempt {attempt}: {before.describe()} -> {after.describe()}")
        print(f"bench: {name}: a service restarted during the measurement "
              f"({restarts[-1]}); waiting for it and measuring again", file=sys.stderr)
        services.wait_until_up(env)
        time.sleep(5)
        env.delete_topics()
    section = Section(name, error=f"services kept restarting: {'; '.join(restarts)}")
    return section


def _settings(sizes: Sizes, env: BenchEnv) -> dict[str, object]:
    from outbox.consumer import ConsumerConfig
    from relay.config import RelayConfig
    from relay.kafka import DEFAULTS

    relay = RelayConfig(database_url=env.database_url, bootstrap_servers=env.bootstrap_servers)
    return {
        "sizes": dataclasses.asdict(sizes),
        "relay": {"batch_size": relay.batch_size, "max_in_flight": relay.max_in_flight,
                  "poll_interval": relay.poll_interval,
                  "listen": relay.listen, "lease_ttl": relay.lease_ttl},
        "kafka_producer": DEFAULTS,
        "consumer": dataclasses.asdict(ConsumerConfig()),
        "database": env.database_name,
    }


def _command(argv: Sequence[str] | None) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    shown = ["--database-url", "<url>"] if "--database-url" in args else []
    rest = [a for i, a in enumerate(args)
            if a != "--database-url" and (i == 0 or args[i - 1] != "--database-url")]
    return shlex.join(["python", "-m", "bench", *rest, *shown])


if __name__ == "__main__":
    sys.exit(main())
