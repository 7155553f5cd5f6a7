"""OUTBOX_LOG_FORMAT=json: one JSON object a line, with the fields a log search needs."""

from __future__ import annotations

import json
import logging

import pytest

from outbox.errors import ConfigError
from outbox.log_format import JsonFormatter, log_context, log_format


def _record(message: str, *args: object, level: int = logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord("relay.relay", level, __file__, 1, message, args, None)


def test_json_lines_lift_event_id_topic_and_relay_id_out_of_the_message() -> None:
    log_context(relay_id="host:1:abc")
    line = JsonFormatter().format(_record(
        "event parked: event_id=%s topic=%s key=%s after %d attempts: %s",
        "0b7e", "payments", "acct-42", 5, "UnknownTopic: nope",
    ))
    assert "\n" not in line
    shown = json.loads(line)
    assert shown["event_id"] == "0b7e" and shown["topic"] == "payments"
    assert shown["relay_id"] == "host:1:abc" and shown["level"] == "WARNING"
    assert shown["logger"] == "relay.relay" and shown["message"].startswith("event parked")
    assert "key" not in shown  # a business key stays in the message, never a field of its own


def test_the_consumers_spelling_event_is_event_id_too() -> None:
    shown = json.loads(JsonFormatter().format(_record("duplicate event x skipped: group=g event=e1 topic=t")))
    assert (shown["event_id"], shown["group"], shown["topic"]) == ("e1", "g", "t")


def test_log_format_is_text_unless_json_and_refuses_anything_else() -> None:
    assert log_format({}) == "text"
    assert log_format({"OUTBOX_LOG_FORMAT": "JSON"}) == "json"
    with pytest.raises(ConfigError, match="OUTBOX_LOG_FORMAT"):
        log_format({"OUTBOX_LOG_FORMAT": "yaml"})
