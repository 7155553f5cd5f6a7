"""Reading the kit's /metrics, /livez and /readyz as Prometheus and Kubernetes would: over HTTP.

The text is parsed by prometheus_client's own parser, so a test (or the
demo's closing figures) shows only what a real scraper would read.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    """A port nobody listens on right now (for a child process that must be told one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def scrape(url: str) -> Samples:
    """Every sample of `url`/metrics: {(name, sorted labels): value}."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        body = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when the series does not exist (yet)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def quantile(samples: Samples, histogram: str, q: float, **labels: str) -> float | None:
    """The `q` quantile of a histogram, as PromQL's histogram_quantile estimates it from its
    buckets (linear within the bucket); None when it has no observations."""
    buckets = sorted(
        (float(dict(key)["le"]), count) for (name, key), count in samples.items()
        if name == f"{histogram}_bucket" and all(dict(key).get(k) == v for k, v in labels.items())
    )
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * ((rank - below) / (count - below) if count > below else 0)
        lower, below = upper, count
    return lower


def probe(url: str, path: str) -> tuple[int, dict[str, Any]]:
    """GET `path` (/livez, /readyz): (status, the JSON body). Any error answer is returned, not
    raised; (0, {}) while nothing listens yet (the server starts with its process or thread)."""
    try:
        with urllib.request.urlopen(f"{url}{path}", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except urllib.error.URLError:
        return 0, {}
