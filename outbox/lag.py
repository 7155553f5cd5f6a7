"""Consumer lag per group, as Kafka sees it: the end of each partition minus the group's committed offset.

The kit's consumer commits an offset only after its database transaction
committed, so this lag is exactly the messages not yet applied (or still in
a transaction). Read with an admin client of its own, two requests per
call: the groups' committed offsets, then the partitions' end offsets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class GroupLag:
    group: str
    partitions: dict[tuple[str, int], int] = field(default_factory=dict)  # (topic, partition) -> lag

    @property
    def total(self) -> int:
        return sum(self.partitions.values())

    def by_topic(self) -> dict[str, int]:
        topics: dict[str, int] = {}
        for (topic, _), lag in sorted(self.partitions.items()):
            topics[topic] = topics.get(topic, 0) + lag
        return topics


def consumer_lag(
    bootstrap_servers: str, groups: Sequence[str] | None = None,
    settings: Mapping[str, Any] | None = None,
) -> list[GroupLag]:
    """Lag of `groups` (default: every consumer group with committed offsets), by group name.

    `settings` are kafka-python client settings (security ones from
    `OUTBOX_KAFKA_*`); those an admin client does not know are left out.
    Raises kafka-python's errors when the broker does not answer.
    """
    from kafka.admin import KafkaAdminClient, OffsetSpec

    known = {k: v for k, v in (settings or {}).items() if k in KafkaAdminClient.DEFAULT_CONFIG}
    admin = KafkaAdminClient(
        **{**known, "bootstrap_servers": bootstrap_servers.split(","), "request_timeout_ms": 10_000,
           "client_id": "outbox-stats"}
    )
    explicit = bool(groups)
    try:
        if not groups:
            groups = sorted(g["group_id"] for g in admin.list_groups() if g.get("protocol_type") == "consumer")
        committed: dict[str, dict[Any, Any]] = {}
        for group in groups:  # one group per request: brokers before 3.0 take no more
            committed.update(admin.list_group_offsets({group: None}))
        partitions = {tp for offsets in committed.values() for tp in offsets}
        ends = admin.list_partition_offsets({tp: OffsetSpec.LATEST for tp in partitions}) if partitions else {}
    finally:
        admin.close()
    lags = []
    for group in groups:
        offsets = committed.get(group, {})
        lags.append(GroupLag(group, {
            (tp.topic, tp.partition): max(ends[tp].offset - meta.offset, 0)
            for tp, meta in offsets.items() if tp in ends and meta.offset >= 0
        }))
    return [lag for lag in lags if explicit or lag.partitions]
