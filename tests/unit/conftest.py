"""Unit tests reach no service: any attempt to open a network connection fails the test.

They run in seconds on a machine with no PostgreSQL and no Kafka
(`make unit`); everything that needs the real services is in
tests/integration/.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    real_connect = socket.socket.connect

    def refuse(self: socket.socket, address: object) -> None:
        if self.family == socket.AF_UNIX:
            real_connect(self, address)  # type: ignore[arg-type]
            return
        raise AssertionError(f"a unit test tried to connect to {address!r}; it belongs in tests/integration/")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    yield
