"""outbox/metrics.py: the label values it makes, and the relay's bulk histogram update."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram

from outbox.metrics import LATENCY_BUCKETS, error_kind, observe_many


def _samples(histogram: Histogram) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in histogram.collect() for s in family.samples if not s.name.endswith("_created")
    }


def test_observe_many_gives_the_same_samples_as_one_observe_per_value() -> None:
    values = [0.0, 0.005, 0.0051, 0.3, 1.0, 7.5, 59.9, 3599.0, 3600.0, 5000.0, -1.0]
    one = Histogram("one_seconds", "x", buckets=LATENCY_BUCKETS, registry=CollectorRegistry())
    many = Histogram("one_seconds", "x", buckets=LATENCY_BUCKETS, registry=CollectorRegistry())
    for value in values:
        one.observe(value)
    observe_many(many, values)
    assert _samples(many) == _samples(one)


def test_error_kind_is_the_error_class_never_the_text_after_it() -> None:
    assert error_kind("UnknownTopic: topic 'payments-4711' does not exist") == "UnknownTopic"
    assert error_kind("KafkaTimeoutError: Batch for TopicPartition(...)") == "KafkaTimeoutError"
    assert error_kind("KafkaError _MSG_TIMED_OUT: Local: Message timed out") == "KafkaError__MSG_TIMED_OUT"
    assert error_kind("no acknowledgement within the flush timeout") == "other"
    assert error_kind(None) == "other"


def test_the_relays_time_parser_agrees_with_fromisoformat() -> None:
    from datetime import datetime

    from relay.observer import _Epochs

    epoch = _Epochs()
    for text in ("2026-12-01T19:00:00.123456Z", "2026-12-01T19:00:00.999999Z",
                 "2024-02-29T23:59:59.000001Z", "2026-12-01T19:00:00Z"):
        assert abs(epoch(text) - datetime.fromisoformat(text).timestamp()) < 1e-6, text
