"""2c. Relay batch size: does a larger `OUTBOX_RELAY_BATCH_SIZE` drain a backlog faster?

Issue 11 asks whether, where a round trip per batch is still the cost, larger
default batches do better. The same backlog is drained by the kafka-python
relay (window at its default) with each batch size in `SIZES`, interleaved
(250, 500, 1000, 2000, 250, ...) `relay_repeats` times so that load from
elsewhere falls on every size alike; the best of each is reported as a ratio
against the default size, 500, measured in the same run.
"""

from __future__ import annotations

from bench.env import BenchEnv
from bench.relay_throughput import fill_and_drain
from bench.report import Row, Section
from bench.settings import Sizes
from relay.config import RelayConfig
from relay.kafka import KafkaPublisher

NAME = "2c relay batch size"
SIZES = (250, 500, 1000, 2000)
DEFAULT = RelayConfig.__dataclass_fields__["batch_size"].default


def run(env: BenchEnv, sizes: Sizes) -> Section:
    section = Section(NAME)
    events = min(sizes.relay_events, 100_000)  # the question is the round, not the table size
    topic = env.topic("batch")
    rates: dict[int, list[float]] = {size: [] for size in SIZES}
    for _ in range(sizes.relay_repeats):
        for size in SIZES:
            _, done, seconds, _ = fill_and_drain(
                env, topic, events, publisher=KafkaPublisher(env.bootstrap_servers),
                batch_size=size, label=f"relay (kafka-python, batch {size})",
            )
            rates[size].append(done / seconds)
    best = {size: max(found) for size, found in rates.items()}
    for size in SIZES:
        section.rows.append(Row(
            NAME, f"batch {size}" + (" (default)" if size == DEFAULT else ""),
            f"{best[size]:,.0f} events/s", value=best[size], limit=best[DEFAULT],
            limit_case=f"batch {DEFAULT}, same run",
        ))
    section.details = {"events": events, "events_per_s": {
        str(size): [round(r, 1) for r in found] for size, found in rates.items()}}
    return section
