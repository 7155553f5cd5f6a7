"""The HTTP side of operations: /metrics, /livez and /readyz on one port.

    /metrics   the Prometheus text format, from prometheus_client's own WSGI app
               (the default registry, so anything else the process registers too)
    /livez     200 {"status": "ok"} while the loop beats, else 503 with the reason
    /readyz    200 {"status": "ok"} when ready, else 503 {"status": "unavailable",
               "reason": "..."}: one line of JSON an orchestrator can log

Served by the standard library's WSGI server, one thread per request, on a
daemon thread, so a scrape never waits for the loop and the loop never
waits for a scrape. Binds 127.0.0.1 unless told otherwise: metrics say how
much money moves, which is nobody's business outside the host by default.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, CollectorRegistry, make_wsgi_app

DEFAULT_HOST = "127.0.0.1"


class Probes(Protocol):
    def live(self) -> str | None:
        """None when live, else why not."""
        ...

    def ready(self) -> str | None:
        """None when ready, else why not."""
        ...


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every 15 s is not worth a log line


class Endpoints:
    """A running server; `port` is the one bound (useful after port 0). `close()` is idempotent."""

    def __init__(
        self, server: _Server, thread: threading.Thread, on_close: Callable[[], object] | None = None
    ) -> None:
        self._server = server
        self._thread = thread
        self._on_close = on_close
        host, port = server.server_address[:2]
        self.host = host.decode() if isinstance(host, bytes) else str(host)
        self.port = int(port)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def close(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()


def serve(
    probes: Probes, *, port: int, host: str = DEFAULT_HOST, registry: CollectorRegistry = REGISTRY,
    on_close: Callable[[], object] | None = None,
) -> Endpoints:
    """Serve /metrics, /livez and /readyz on `host:port` (0: any free port) until `close()`,
    which then calls `on_close` (to stop the probes behind them).

    Raises OSError when the port cannot be bound (in use, not allowed).
    """
    server = make_server(host, port, _app(probes, make_wsgi_app(registry)), _Server, _QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="outbox-endpoints", daemon=True)
    thread.start()
    return Endpoints(server, thread, on_close)


Start = Callable[[str, list[tuple[str, str]]], Any]


def _app(probes: Probes, metrics: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: Start) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/livez":
            return _answer(start_response, probes.live())
        if path == "/readyz":
            return _answer(start_response, probes.ready())
        if path in ("/metrics", "/"):
            return metrics(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /metrics, /livez or /readyz\n"]

    return app


def _answer(start_response: Start, problem: str | None) -> list[bytes]:
    if problem is None:
        status, body = "200 OK", {"status": "ok"}
    else:
        status, body = "503 Service Unavailable", {"status": "unavailable", "reason": problem}
    start_response(status, [("Content-Type", "application/json")])
    return [json.dumps(body).encode() + b"\n"]
