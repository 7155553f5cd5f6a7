"""Bytes written where only text fits (dead-letter headers, `dead-letters list`): one encoding."""

from __future__ import annotations

import pytest

from outbox.envelope import bytes_from_text_or_hex, headers_as_json, text_or_hex


@pytest.mark.parametrize("raw", [b"pay-3", "zürich".encode(), b"\xff\xfe", b"a\x00b", b""])
def test_bytes_written_as_text_or_hex_read_back_as_the_same_bytes(raw: bytes) -> None:
    written = text_or_hex(raw)
    assert written is not None and "\x00" not in written
    assert bytes_from_text_or_hex(written) == raw


def test_utf8_stays_readable_and_only_odd_bytes_become_hex() -> None:
    assert text_or_hex(b"pay-3") == "pay-3"
    assert text_or_hex(b"\xff") == "hex:ff"
    assert text_or_hex(b"a\x00b") == "hex:610062"  # JSONB refuses \u0000
    assert text_or_hex(None) is None


def test_headers_for_a_jsonb_column_never_hold_a_nul() -> None:
    stored = headers_as_json([("trace\x00id", b"x"), ("bin", b"\x00\x01"), ("none", None)])  # type: ignore[list-item]
    assert stored == {"trace\\x00id": "x", "bin": "hex:0001", "none": ""}
