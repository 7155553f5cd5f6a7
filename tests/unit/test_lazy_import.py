"""`import outbox` to publish does not load the consumer or kafka-python (issue 10).

Each check runs in a fresh interpreter: this test process has long imported both.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from harness.devstack import REPO


def _run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
        timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_importing_outbox_to_publish_loads_neither_kafka_nor_the_consumer() -> None:
    out = _run("""
        import sys
        import outbox
        outbox.publish, outbox.publish_async, outbox.Event, outbox.OutboxError
        loaded = sorted(m for m in sys.modules
                        if m.split('.')[0] == 'kafka' or m in ('outbox.consumer', 'tenacity'))
        print(loaded)
    """)
    assert out == "[]"


def test_the_consumer_is_still_reachable_from_the_package() -> None:
    out = _run("""
        import outbox
        from outbox import ConsumerStats
        from outbox.consumer import Consumer, ConsumerConfig
        assert outbox.Consumer is Consumer and outbox.ConsumerConfig is ConsumerConfig
        assert ConsumerStats().applied == 0
        assert {'Consumer', 'ConsumerConfig', 'ConsumerStats'} <= set(dir(outbox))
        print('ok')
    """)
    assert out == "ok"


def test_an_unknown_package_attribute_is_still_an_attribute_error() -> None:
    out = _run("""
        import outbox
        try:
            outbox.Consumr
        except AttributeError as exc:
            print(exc)
    """)
    assert out == "module 'outbox' has no attribute 'Consumr'"


def test_publishing_consuming_and_relaying_import_no_opentelemetry() -> None:
    # Tracing costs nothing when absent: the kit never imports OpenTelemetry
    # itself (outbox/tracing.py looks in sys.modules), installed or not.
    out = _run("""
        import sys
        import outbox, outbox.consumer, outbox.tracing, relay.relay, relay.observer
        with outbox.tracing.create_span("payments", {"a": "b"}) as span:
            assert span.headers == {"a": "b"}
        assert not outbox.tracing.enabled()
        print(sorted(m for m in sys.modules if m.split('.')[0] == 'opentelemetry'))
    """)
    assert out == "[]"
