"""The payments example's client retry tells a lost connection from everything else by
exception type, never by the text of the message (users copy the example)."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from examples.payments.service import TransitionError
from examples.payments.system import _connection_lost, _move, _retry_db


def _wrapped(cls: type[DBAPIError], orig: Exception, *, invalidated: bool = False) -> DBAPIError:
    return cls("SELECT 1", {}, orig, connection_invalidated=invalidated)


def test_a_lost_connection_is_retried_whatever_its_message_says() -> None:
    assert _connection_lost(_wrapped(OperationalError, psycopg.OperationalError("server closed")))
    assert _connection_lost(psycopg.OperationalError("no text to match"))
    assert _connection_lost(_wrapped(DBAPIError, Exception("?"), invalidated=True))


def test_an_error_that_mentions_connection_or_terminate_is_not_retried_for_its_words() -> None:
    orig = psycopg.IntegrityError('duplicate key "connection_terminated"')
    assert not _connection_lost(_wrapped(IntegrityError, orig))
    assert not _connection_lost(ValueError("connection terminated"))


def test_the_call_is_repeated_until_the_database_answers() -> None:
    attempts: list[int] = []

    def action() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise _wrapped(OperationalError, psycopg.OperationalError("restarting"))
        return "done"

    assert _retry_db(action) == "done"
    assert len(attempts) == 3


def test_a_move_that_already_happened_before_the_connection_dropped_counts_as_done() -> None:
    def action() -> None:
        raise TransitionError(uuid.uuid4(), "captured", "captured")

    _move(action, already="captured")
    with pytest.raises(TransitionError):
        _move(action, already="authorised")
