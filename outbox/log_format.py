"""The daemons' log format: text for people, or `OUTBOX_LOG_FORMAT=json` for log pipelines.

JSON is one object a line, with `time`, `level`, `logger`, `message`, and the
fields a log search needs lifted out of the message where they apply:
`event_id`, `topic`, `relay_id`, `group`, `partition`, `offset`, `attempt`
(the kit's messages already say `event_id=... topic=...`, so a line reads
the same in both formats, and no call site changes). The relay id of the
process is on every line (`log_context`).

Only for processes the kit runs (the relay daemon): the library itself
configures no handlers, ever. A host application that wants JSON may put
`JsonFormatter` on its own handler.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar

from outbox.errors import ConfigError

LOG_FORMAT_ENV = "OUTBOX_LOG_FORMAT"
FORMATS = ("text", "json")

# Message fields worth a JSON key; `event=` and `relay=` are spelt so in some lines.
# Never `key=`: a payment's key is business data, kept in the message only.
_FIELD = re.compile(r"\b(event_id|event|topic|relay_id|relay|group|partition|offset|attempt)=([^\s,]+)")
_RENAMED = {"event": "event_id", "relay": "relay_id"}


def log_format(env: Mapping[str, str] | None = None) -> str:
    """`text` (the default) or `json`, from OUTBOX_LOG_FORMAT; ConfigError for anything else."""
    raw = (os.environ if env is None else env).get(LOG_FORMAT_ENV, "").strip().lower() or "text"
    if raw not in FORMATS:
        raise ConfigError(LOG_FORMAT_ENV, f"{raw!r} is not one of {', '.join(FORMATS)}")
    return raw


class JsonFormatter(logging.Formatter):
    """One JSON object per record, with the message's fields lifted out (see the module docstring)."""

    context: ClassVar[dict[str, str]] = {}  # fields on every line: log_context()

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
            **self.context,
        }
        for name, value in _FIELD.findall(message):
            line.setdefault(_RENAMED.get(name, name), value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def log_context(**fields: str) -> None:
    """Fields every JSON line of this process carries from now on (the relay id)."""
    JsonFormatter.context.update(fields)


def configure_daemon_logging(level: int | str, *, text_format: str, format: str = "text") -> None:
    """The daemon's root handler on stderr, in `format` (see `log_format`)."""
    if format == "json":
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
        logging.basicConfig(level=level, handlers=[handler])
    else:
        logging.basicConfig(level=level, format=text_format)
