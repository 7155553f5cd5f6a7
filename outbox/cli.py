"""The `outbox` command. `main` only parses and dispatches; each command is a
plain function over the library (`outbox.migrate`, `outbox.stats`,
`outbox.parked`, `outbox.dead_letters`, `relay.daemon`).

Every `OutboxError` becomes one line on stderr and exit code 1 (2 for bad
configuration); no traceback, no secret.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Engine, create_engine

from outbox import migrate
from outbox.config import database_url
from outbox.errors import ConfigError, OutboxError

Command = Callable[[argparse.Namespace], int]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command: Command | None = getattr(args, "command", None)
    if command is None:
        parser.print_help()
        return 2
    try:
        return command(args)
    except ConfigError as exc:
        print(f"outbox: {exc}", file=sys.stderr)
        return 2
    except OutboxError as exc:
        print(f"outbox: {exc}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="outbox", description="Transactional outbox: migrations, relay, operations."
    )
    parser.add_argument(
        "--database-url", help="SQLAlchemy URL; default: $OUTBOX_DATABASE_URL", default=None
    )
    commands = parser.add_subparsers(title="commands")

    db = commands.add_parser("db", help="create, update and check the kit's tables")
    db_commands = db.add_subparsers(title="db commands")
    up = db_commands.add_parser("upgrade", help="migrate to the newest schema (or --revision)")
    up.add_argument("--revision", default=migrate.HEAD)
    up.add_argument("--sql", action="store_true", help="print the DDL instead of running it")
    up.set_defaults(command=db_upgrade)
    down = db_commands.add_parser("downgrade", help="undo migrations down to --revision")
    down.add_argument("--revision", default="base", help="default: base (drops the kit's tables)")
    down.add_argument("--sql", action="store_true", help="print the DDL instead of running it")
    down.set_defaults(command=db_downgrade)
    db_commands.add_parser("current", help="the revision the database is at").set_defaults(
        command=db_current
    )
    db_commands.add_parser("history", help="the revisions this kit ships").set_defaults(
        command=db_history
    )
    db_commands.add_parser(
        "check", help="exit 1 unless the database matches the kit's models"
    ).set_defaults(command=db_check)

    relay_parser = commands.add_parser("relay", help="run the relay daemon (publish to Kafka)")
    from relay.daemon import add_arguments

    add_arguments(relay_parser)
    relay_parser.set_defaults(command=run_relay)

    commands.add_parser(
        "stats", help="backlog Q = n - m, oldest unpublished event, parked events"
    ).set_defaults(command=stats)

    parked = commands.add_parser("parked", help="events the relay could not publish")
    parked_commands = parked.add_subparsers(title="parked commands")
    parked_list = parked_commands.add_parser("list", help="show parked events with their error")
    parked_list.add_argument("--limit", type=int, default=100)
    parked_list.set_defaults(command=parked_list_command)
    parked_replay = parked_commands.add_parser("replay", help="put parked events back in line")
    parked_replay.add_argument("ids", nargs="*", type=uuid.UUID, help="event ids (default: all)")
    parked_replay.set_defaults(command=parked_replay_command)

    dead = commands.add_parser("dead-letters", help="messages a consumer could not apply")
    dead_commands = dead.add_subparsers(title="dead-letter commands")
    dead_list = dead_commands.add_parser("list", help="show dead letters with their error")
    dead_list.add_argument("--group", help="only this consumer group")
    dead_list.add_argument("--limit", type=int, default=100)
    dead_list.set_defaults(command=dead_letters_list_command)
    dead_replay = dead_commands.add_parser(
        "replay", help="apply dead letters again through the consumer's handler"
    )
    dead_replay.add_argument("--group", required=True)
    dead_replay.add_argument(
        "--handler", required=True, help="the consumer's handler as package.module:function"
    )
    dead_replay.add_argument("ids", nargs="*", type=int, help="dead-letter ids (default: all)")
    dead_replay.set_defaults(command=dead_letters_replay_command)

    inbox = commands.add_parser("inbox", help="the consumers' record of applied event ids")
    inbox_commands = inbox.add_subparsers(title="inbox commands")
    purge = inbox_commands.add_parser(
        "purge", help="delete inbox rows older than --older-than (see README: retention rule)"
    )
    purge.add_argument("--older-than", required=True, help="e.g. 14d, 36h, 90m")
    purge.add_argument("--group", help="only this consumer group")
    purge.set_defaults(command=inbox_purge_command)
    return parser


# -- db -------------------------------------------------------------------


def db_upgrade(args: argparse.Namespace) -> int:
    migrate.upgrade(args.database_url, args.revision, sql=args.sql)
    if not args.sql:
        print(f"outbox: database at {migrate.current(args.database_url)}")
    return 0


def db_downgrade(args: argparse.Namespace) -> int:
    migrate.downgrade(args.database_url, args.revision, sql=args.sql)
    if not args.sql:
        print(f"outbox: database at {migrate.current(args.database_url) or 'base (no tables)'}")
    return 0


def db_current(args: argparse.Namespace) -> int:
    at = migrate.current(args.database_url)
    head = migrate.head()
    print(f"{at or 'base'}{' (head)' if at == head else f' (head is {head})'}")
    return 0


def db_history(args: argparse.Namespace) -> int:
    for line in migrate.history():
        print(line)
    return 0


def db_check(args: argparse.Namespace) -> int:
    migrate.check(args.database_url)
    print("outbox: schema matches the kit's models")
    return 0


# -- relay, stats, parked -------------------------------------------------


def run_relay(args: argparse.Namespace) -> int:
    from relay.daemon import run

    return run(args)


def stats(args: argparse.Namespace) -> int:
    from outbox.stats import outbox_stats

    with _engine(args).connect() as conn:
        s = outbox_stats(conn)
    age = f"{s.oldest_age.total_seconds():.1f}s" if s.oldest_age is not None else "-"
    print(f"committed (n)         {s.committed}")
    print(f"published (m)         {s.published}")
    print(f"backlog (Q = n - m)   {s.backlog}")
    print(f"oldest unpublished    {age}")
    print(f"parked                {s.parked}")
    return 0


def parked_list_command(args: argparse.Namespace) -> int:
    from outbox.parked import list_parked

    with _engine(args).connect() as conn:
        events = list_parked(conn, limit=args.limit)
    for e in events:
        print(json.dumps({
            "id": str(e.id), "topic": e.topic, "key": e.key, "type": e.type,
            "attempts": e.attempts, "parked_at": e.parked_at.isoformat(), "size": e.size,
            "error": e.error,
        }))
    print(f"{len(events)} parked event(s)", file=sys.stderr)
    return 0


def parked_replay_command(args: argparse.Namespace) -> int:
    from outbox.parked import replay_parked

    with _engine(args).begin() as conn:
        count = replay_parked(conn, args.ids or None)
    print(f"outbox: {count} event(s) back in the outbox")
    return 0


# -- consumer side ----------------------------------------------------------


def dead_letters_list_command(args: argparse.Namespace) -> int:
    from outbox.dead_letters import list_dead_letters

    with _engine(args).connect() as conn:
        letters = list_dead_letters(conn, group=args.group, limit=args.limit)
    for letter in letters:
        print(json.dumps(_jsonable(letter), default=str))
    print(f"{len(letters)} dead letter(s)", file=sys.stderr)
    return 0


def dead_letters_replay_command(args: argparse.Namespace) -> int:
    from outbox.dead_letters import import_handler, replay_dead_letters

    result = replay_dead_letters(
        _engine(args), group=args.group, ids=args.ids or None,
        handler=import_handler(args.handler),
    )
    print(
        f"outbox: {len(result.applied)} applied, {len(result.duplicates)} already applied, "
        f"{len(result.skipped)} skipped, {len(result.failed)} still failing"
    )
    return 1 if result.failed else 0


def inbox_purge_command(args: argparse.Namespace) -> int:
    from outbox.dead_letters import purge_inbox

    # Each batch commits on its own: a purge of millions of rows holds no long transaction.
    count = purge_inbox(_engine(args), older_than=parse_duration(args.older_than), group=args.group)
    print(f"outbox: {count} inbox row(s) purged")
    return 0


def parse_duration(text: str) -> Any:
    from datetime import timedelta

    units = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}
    number, unit = text[:-1], text[-1:]
    if unit not in units or not number.isdigit():
        raise ConfigError("--older-than", f"{text!r} is not a duration like 14d, 36h, 90m or 30s")
    return timedelta(**{units[unit]: int(number)})


def _engine(args: argparse.Namespace) -> Engine:
    return create_engine(database_url(args.database_url), pool_pre_ping=True)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(value)
    if hasattr(value, "_asdict"):
        return value._asdict()
    return value
