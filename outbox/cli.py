"""The `outbox` command. `main` only parses and dispatches; each command is a
plain function over the library (`outbox.migrate`, `outbox.stats`,
`outbox.parked`, `outbox.dead_letters`, `relay.daemon`). Each command's
module is imported when that command runs, so `outbox db upgrade` never
loads the relay daemon (its options come from the light `relay.options`).

Whatever goes wrong ends in one line on stderr, never a traceback, and never
a secret (database URLs and `password=` pairs are masked, and an argument
the parser did not recognise is shown by its option name only):

    exit 2   the command line or a setting is wrong (`ConfigError`, argparse)
    exit 1   the command ran and failed: an `OutboxError`, or the database
             refused (wrong password, unreachable, tables missing: "run
             `outbox db upgrade`")

The options every command shares (`--database-url`, `--log-level`) are
defined once, in `shared_options()`, and attached to every parser level, so
they work before or after any subcommand: `outbox --database-url URL db
upgrade` and `outbox db upgrade --database-url URL` are the same.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import uuid
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, NoReturn

from sqlalchemy import Engine, create_engine
from sqlalchemy.exc import SQLAlchemyError

from outbox import migrate, rabbitmq_topology
from outbox.config import database_url, safe_url
from outbox.envelope import text_or_hex
from outbox.errors import ConfigError, OutboxError, describe_error, mask_secrets

Command = Callable[[argparse.Namespace], int]

log = logging.getLogger(__name__)

# An inbox row younger than this is very likely still needed to deduplicate a
# redelivery (see outbox.consumer, "Inbox retention"); purging that young
# needs --yes.
SHORTEST_SAFE_PURGE = timedelta(days=1)

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# What a shared option means when nobody gave it: argparse.SUPPRESS keeps an
# option given at one level from being overwritten by another level's default,
# so the defaults are filled in after parsing (`apply_shared_defaults`).
SHARED_DEFAULTS: dict[str, Any] = {"database_url": None, "log_level": None}


class Parser(argparse.ArgumentParser):
    """argparse, with error lines that never echo a secret from the command line."""

    def parse_args(  # type: ignore[override]  # same call, narrower result
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        words = sys.argv[1:] if args is None else list(args)
        misplaced = _misplaced_option(self, words)
        if misplaced is not None:
            self.error(misplaced)
        parsed, extras = self.parse_known_args(words, namespace)
        if extras:
            # argparse would print the leftover words as they are; one of them
            # is often a URL with its password, or the password itself.
            self.error(f"unrecognized arguments: {' '.join(_option_names(extras))}")
        return parsed

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {mask_secrets(message)}\n")


def shared_options() -> argparse.ArgumentParser:
    """The options every level of the command line accepts (a parent parser)."""
    shared = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    shared.add_argument(
        "--database-url", metavar="URL", help="SQLAlchemy URL; default: $OUTBOX_DATABASE_URL"
    )
    shared.add_argument(
        "--log-level", type=log_level, metavar="LEVEL",
        help="DEBUG, INFO, WARNING, ERROR or CRITICAL; default: INFO for relay, else WARNING",
    )
    return shared


def apply_shared_defaults(args: argparse.Namespace, **overrides: Any) -> argparse.Namespace:
    """Fill in the shared options nobody gave (see SHARED_DEFAULTS)."""
    for name, default in {**SHARED_DEFAULTS, **overrides}.items():
        if getattr(args, name, None) is None:
            setattr(args, name, default)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command: Command | None = getattr(args, "command", None)
    if command is None:
        parser.print_help(sys.stderr)
        return 2
    if command is run_relay:
        apply_shared_defaults(args, log_level="INFO")  # relay.daemon.run configures logging
    else:
        apply_shared_defaults(args, log_level="WARNING")
        logging.basicConfig(level=args.log_level, format="outbox: %(levelname)s %(name)s %(message)s")
    try:
        return command(args)
    except ConfigError as exc:
        return _fail(str(exc), 2)
    except OutboxError as exc:
        return _fail(str(exc), 1)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except BrokenPipeError:
        # `outbox db upgrade --sql | head`: the reader has all it wanted. Point
        # stdout at /dev/null so the interpreter's final flush stays quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except (SQLAlchemyError, OSError) as exc:
        log.debug("database error", exc_info=True)
        return _fail(database_error_line(exc, args), 1)
    except Exception as exc:
        # A bug: still one line, and the traceback for whoever asks for it.
        log.debug("unexpected error", exc_info=True)
        return _fail(f"unexpected error: {describe_error(exc)} (--log-level DEBUG shows where)", 1)


def build_parser() -> Parser:
    shared = [shared_options()]
    parser = Parser(
        prog="outbox", description="Transactional outbox: migrations, relay, operations.",
        parents=shared,
    )
    commands = parser.add_subparsers(title="commands")

    def command(
        group: Any, name: str, help: str, function: Command | None = None
    ) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = group.add_parser(name, help=help, parents=shared)
        if function is not None:
            sub.set_defaults(command=function)
        return sub

    db = command(commands, "db", "create, update and check the kit's tables")
    db_commands = db.add_subparsers(title="db commands")
    up = command(db_commands, "upgrade", "migrate to the newest schema (or --revision)", db_upgrade)
    up.add_argument("--revision", default=migrate.HEAD)
    up.add_argument(
        "--sql", action="store_true", help="print the DDL instead of running it (needs no database)"
    )
    down = command(db_commands, "downgrade", "undo migrations down to --revision", db_downgrade)
    down.add_argument("--revision", default="base", help="default: base (drops the kit's tables)")
    down.add_argument("--sql", action="store_true", help="print the DDL instead of running it")
    down.add_argument(
        "--force", action="store_true",
        help="drop tables that still hold events, inbox rows or dead letters (they are lost)",
    )
    command(db_commands, "current", "the revision the database is at", db_current)
    command(db_commands, "history", "the revisions this kit ships", db_history)
    command(
        db_commands, "check",
        "exit 1 unless the database matches the kit's models, commit trigger included", db_check,
    )
    grants = command(
        db_commands, "grants",
        "give the writer, relay and consumer roles their least privileges (or print them: --sql)",
        db_grants,
    )
    for side in ("writer", "relay", "consumer"):
        grants.add_argument(f"--{side}", metavar="ROLE", help=f"the {side}'s database role")
    grants.add_argument("--schema", default="public", help="the kit's schema (default: public)")
    grants.add_argument("--sql", action="store_true", help="print the statements (needs no database)")

    # relay.options, not relay.daemon: building the parser for `outbox db upgrade`
    # must not import the relay loop and a Kafka client.
    from relay.options import add_arguments

    add_arguments(command(commands, "relay", "run the relay daemon (publish to Kafka)", run_relay))

    stats_command = command(
        commands, "stats", "the on-call view: backlog Q = n - m, oldest event, rate, drain time, lag", stats
    )
    stats_command.add_argument("--json", action="store_true", help="one JSON object instead of text")
    stats_command.add_argument(
        "--watch", action="store_true", help="refresh in place every --interval seconds until Ctrl-C"
    )
    stats_command.add_argument("--interval", type=positive_float, default=2.0, help="default: 2")
    stats_command.add_argument(
        "--bootstrap-servers", help="also show consumer lag per group, read from this Kafka cluster"
    )
    stats_command.add_argument(
        "--group", action="append", help="only this consumer group's lag (repeatable); default: all"
    )

    parked = command(commands, "parked", "events the relay could not publish")
    parked_commands = parked.add_subparsers(title="parked commands")
    parked_list = command(
        parked_commands, "list", "show parked events with their error", parked_list_command
    )
    parked_list.add_argument("--limit", type=positive_int, default=100)
    parked_replay = command(
        parked_commands, "replay", "put parked events back in line", parked_replay_command
    )
    parked_replay.add_argument("ids", nargs="*", type=event_id, help="event ids (default: all)")

    dead = command(commands, "dead-letters", "messages a consumer could not apply")
    dead_commands = dead.add_subparsers(title="dead-letter commands")
    dead_list = command(
        dead_commands, "list", "show dead letters with their error", dead_letters_list_command
    )
    dead_list.add_argument("--group", help="only this consumer group")
    dead_list.add_argument("--limit", type=positive_int, default=100)
    dead_replay = command(
        dead_commands, "replay", "apply dead letters again through the consumer's handler",
        dead_letters_replay_command,
    )
    dead_replay.add_argument("--group", required=True)
    dead_replay.add_argument(
        "--handler", required=True, help="the consumer's handler as package.module:function"
    )
    dead_replay.add_argument(
        "ids", nargs="*", type=positive_int, help="dead-letter ids (default: all)"
    )
    dead_discard = command(
        dead_commands, "discard",
        "give up on dead letters that can never be applied (kept, marked, logged)",
        dead_letters_discard_command,
    )
    dead_discard.add_argument("--group", required=True)
    dead_discard.add_argument(
        "--reason", required=True, help="why; stored with the dead letter and logged"
    )
    dead_discard.add_argument("ids", nargs="+", type=positive_int, help="dead-letter ids")

    rabbit = command(commands, "rabbitmq", "RabbitMQ topology (OUTBOX_RABBITMQ_URL)")
    rabbit_declare = command(
        rabbit.add_subparsers(title="rabbitmq commands"), "declare",
        "declare the topics' exchanges and a group's queues, idempotently", rabbitmq_topology.declare_command,
    )
    rabbit_declare.add_argument("--topic", action="append", required=True, help="repeat for more topics")
    rabbit_declare.add_argument("--group", help="the consumer group whose queues to declare")
    rabbit_declare.add_argument("--queues", type=positive_int, default=rabbitmq_topology.DEFAULT_QUEUES)
    rabbit_declare.add_argument(
        "--delivery-limit", type=positive_int, default=rabbitmq_topology.DEFAULT_DELIVERY_LIMIT,
        help="deliveries before the broker dead-letters a message (x-delivery-limit)",
    )

    inbox = command(commands, "inbox", "the consumers' record of applied event ids")
    inbox_commands = inbox.add_subparsers(title="inbox commands")
    purge = command(
        inbox_commands, "purge",
        "delete inbox rows older than --older-than (see README: retention rule)",
        inbox_purge_command,
    )
    purge.add_argument("--older-than", required=True, type=duration, help="e.g. 14d, 36h, 90m")
    purge.add_argument("--group", help="only this consumer group")
    purge.add_argument(
        "--yes", action="store_true",
        help=f"purge even when --older-than is under {SHORTEST_SAFE_PURGE.days} day",
    )
    return parser


# -- db -------------------------------------------------------------------


def db_upgrade(args: argparse.Namespace) -> int:
    migrate.upgrade(args.database_url, args.revision, sql=args.sql)
    if not args.sql:
        print(f"outbox: database at {migrate.current(args.database_url)}")
    return 0


def db_downgrade(args: argparse.Namespace) -> int:
    migrate.downgrade(args.database_url, args.revision, sql=args.sql, force=args.force)
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


def db_grants(args: argparse.Namespace) -> int:
    from outbox.grants import Roles, apply_grants, grant_statements

    roles = Roles(writer=args.writer, relay=args.relay, consumer=args.consumer)
    if args.sql:
        print("\n".join(grant_statements(roles, args.schema)))
        return 0
    with _engine(args).begin() as conn:
        done = apply_grants(conn, roles, args.schema)
    print(f"outbox: {len(done)} statements applied for {', '.join(roles.named())} in {_shown_url(args)}")
    return 0


# -- relay, stats, parked -------------------------------------------------


def run_relay(args: argparse.Namespace) -> int:
    from relay.daemon import run

    return run(args)


def stats(args: argparse.Namespace) -> int:
    from functools import partial

    from outbox import oncall
    from outbox.config import kafka_client_config

    read = partial(
        oncall.gather, _engine(args), bootstrap_servers=args.bootstrap_servers, groups=args.group,
        kafka_settings=kafka_client_config() if args.bootstrap_servers else None,
    )
    render = oncall.dumps if args.json else oncall.as_text
    if args.watch:
        try:
            oncall.watch(read, interval=args.interval, render=render)
        except KeyboardInterrupt:
            print(file=sys.stderr)  # Ctrl-C is how a watch ends: exit 0, no "interrupted"
        return 0
    view = read()
    print(render(view))
    s = view.stats
    if s.unnumbered:
        # Exit 1 as well, so a monitoring check that only looks at the code notices.
        return _fail(
            f"{s.unnumbered} committed event(s) have no position and will never be published: "
            "the commit trigger is missing or broken; run `outbox db check`", 1,
        )
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
    from dataclasses import asdict

    from outbox.dead_letters import list_dead_letters

    with _engine(args).connect() as conn:
        letters = list_dead_letters(conn, group=args.group, limit=args.limit)
    for letter in letters:
        row = asdict(letter)
        row["key"], row["value"] = text_or_hex(letter.key), text_or_hex(letter.value)
        print(json.dumps(row, default=str, ensure_ascii=False))
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


def dead_letters_discard_command(args: argparse.Namespace) -> int:
    from outbox.dead_letters import discard_dead_letters

    with _engine(args).begin() as conn:
        discarded = discard_dead_letters(conn, group=args.group, ids=args.ids, reason=args.reason)
    print(f"outbox: {len(discarded)} dead letter(s) discarded: {', '.join(map(str, discarded))}")
    return 0


def inbox_purge_command(args: argparse.Namespace) -> int:
    from outbox.inbox import purge_inbox

    older_than: timedelta = args.older_than
    if older_than < SHORTEST_SAFE_PURGE:
        risk = (
            f"{_shown_duration(older_than)} is under {SHORTEST_SAFE_PURGE.days} day: "
            "a message delivered again after its inbox row is purged is applied twice; keep rows "
            "longer than the topic's retention.ms plus the longest consumer lag"
        )
        if not args.yes:
            raise ConfigError("--older-than", f"{risk}; pass --yes if that is what you want")
        print(f"outbox: warning: --older-than {risk}", file=sys.stderr)
    # Each batch commits on its own: a purge of millions of rows holds no long transaction.
    count = purge_inbox(_engine(args), older_than=older_than, group=args.group)
    print(f"outbox: {count} inbox row(s) purged")
    return 0


# -- argument types: each refuses a bad value with one line (exit 2) --------


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def event_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an event id (a UUID)") from None


def log_level(text: str) -> str:
    level = text.upper()
    if level not in _LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(_LOG_LEVELS)}")
    return level


def duration(text: str) -> timedelta:
    """`14d`, `36h`, `90m` or `30s` as a timedelta."""
    units = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}
    number, unit = text[:-1], text[-1:]
    if unit not in units or not number.isascii() or not number.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 14d, 36h, 90m or 30s")
    try:
        value = timedelta(**{units[unit]: int(number)})
    except OverflowError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is longer than {timedelta.max.days} days"
        ) from None
    if value <= timedelta(0):
        raise argparse.ArgumentTypeError(f"{text!r} must be longer than zero")
    return value


# -- output -------------------------------------------------------------------


def database_error_line(exc: BaseException, args: argparse.Namespace) -> str:
    """One line for an error the database (or the way to it) raised; secrets masked."""
    import psycopg.errors

    where = _shown_url(args)
    cause = getattr(exc, "orig", None) or exc
    if isinstance(cause, psycopg.errors.UndefinedTable):
        return f"the kit's tables are missing in {where}: run `outbox db upgrade`"
    if isinstance(cause, psycopg.OperationalError | OSError):
        text = describe_error(cause)
        check = ("sslmode and sslrootcert (the CA file) in the URL's query" if _TLS_WORDS.search(text)
                 else "host, port, user and password")
        return f"cannot use the database {where}: {text}; check {check} of --database-url / $OUTBOX_DATABASE_URL"
    return f"database error on {where}: {describe_error(cause)}"


# libpq's words for a TLS problem: then the URL's TLS parameters are what to check.
_TLS_WORDS = re.compile(r"SSL|certificate|no encryption", re.IGNORECASE)


def _fail(message: str, code: int) -> int:
    print(f"outbox: {mask_secrets(message)}", file=sys.stderr)
    return code


def _misplaced_option(parser: argparse.ArgumentParser, words: Sequence[str]) -> str | None:
    """Why an option given before its command's name would fail, or None.

    argparse would take the option's value for the command name and answer
    "invalid choice: '3'" for `outbox --batch-size 3 relay`; the shared
    options work at every level, the others belong after their command.
    """
    level, index = parser, 0
    while index < len(words):
        word = words[index]
        commands = _subcommands(level)
        if not commands:
            return None  # the command itself: argparse checks the rest
        if word in commands:
            level = commands[word]
        elif word.startswith("-") and len(word) > 1:
            name, eq, _ = word.partition("=")
            actions = [a for o, a in level._option_string_actions.items() if o.startswith(name)]
            if not actions:
                owners = _commands_with(level, name)
                where = (f"put it after the command it belongs to: `{owners[0]} {name} ...`"
                         if owners else "see `outbox --help`")
                return f"{name} is not an option of `{level.prog}`; {where}"
            if actions[0].nargs != 0 and not eq:
                index += 1  # its value
        index += 1
    return None


def _commands_with(parser: argparse.ArgumentParser, option: str) -> list[str]:
    """The progs of the commands below `parser` that take `option`."""
    found: list[str] = []
    for sub in _subcommands(parser).values():
        if option in sub._option_string_actions:
            found.append(sub.prog)
        found.extend(_commands_with(sub, option))
    return found


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _option_names(words: Sequence[str]) -> list[str]:
    # "--database-url=postgresql://u:pw@h/db" -> "--database-url=..."; a free word -> "..."
    shown = []
    for word in words:
        if word.startswith("-") and len(word) > 1:
            name, eq, _ = word.partition("=")
            shown.append(name + ("=..." if eq else ""))
        else:
            shown.append("...")
    return shown


def _shown_duration(value: timedelta) -> str:
    return f"{int(value.total_seconds())}s"


def _shown_url(args: argparse.Namespace) -> str:
    try:
        return safe_url(database_url(getattr(args, "database_url", None)))
    except OutboxError:
        return "the database"


def _engine(args: argparse.Namespace) -> Engine:
    return create_engine(database_url(args.database_url), pool_pre_ping=True)
