"""Topic administration shared by the demo, the tests and operators' scripts."""

from __future__ import annotations

import time
from collections.abc import Mapping

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from stream_scorer.errors import BrokerError


def ensure_topics(
    bootstrap: str,
    topics: Mapping[str, int],
    *,
    timeout: float = 30.0,
    config: Mapping[str, str] | None = None,
) -> None:
    """Create ``topics`` (name to partition count, replication factor 1) unless they exist.

    Returns once every topic has a leader for each partition.

    Raises:
        BrokerError: a topic cannot be created or does not become ready in time.
    """
    admin = AdminClient({"bootstrap.servers": bootstrap})
    new = [NewTopic(name, n, 1, config=dict(config or {})) for name, n in topics.items()]
    futures = admin.create_topics(new, request_timeout=timeout)
    for name, future in futures.items():
        try:
            future.result(timeout=timeout)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise BrokerError(f"cannot create topic: {exc}", topic=name) from exc
    deadline = time.monotonic() + timeout
    pending = dict(topics)
    while pending:
        meta = admin.list_topics(timeout=max(1.0, deadline - time.monotonic()))
        for name in list(pending):
            tmeta = meta.topics.get(name)
            if (
                tmeta is not None
                and tmeta.error is None
                and len(tmeta.partitions) >= pending[name]
                and all(p.leader >= 0 for p in tmeta.partitions.values())
            ):
                del pending[name]
        if pending and time.monotonic() > deadline:
            raise BrokerError(f"topics not ready after {timeout:.0f} s: {', '.join(pending)}")
        if pending:
            time.sleep(0.1)
