"""Small Kafka client helpers shared by the tools, the demo, the benchmark and the tests.

Produce with the queue-full retry, a topic's end offsets, and "read a topic to its end" — each
written once here.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from confluent_kafka import Consumer, KafkaError, TopicPartition

from stream_scorer.errors import BrokerError


def produce_retrying(
    producer: Any, topic: str, value: bytes | None, *, wait_s: float = 0.05, **kwargs: Any
) -> None:
    """``producer.produce(topic, value, **kwargs)``, serving the queue while it is full."""
    while True:
        try:
            producer.produce(topic, value=value, **kwargs)
            return
        except BufferError:
            producer.poll(wait_s)


def end_offsets(consumer: Any, topic: str, timeout_s: float = 10.0) -> dict[int, int]:
    """The high watermark of every partition of ``topic``."""
    partitions = consumer.list_topics(topic, timeout=timeout_s).topics[topic].partitions
    return {
        p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)[1]
        for p in partitions
    }


def topic_end_offsets(
    bootstrap: str, topic: str, settings: Mapping[str, Any] | None = None
) -> dict[int, int]:
    """``end_offsets`` of ``topic`` through a short-lived consumer of its own."""
    consumer = Consumer(
        {
            **(settings or {}),
            "bootstrap.servers": bootstrap,
            "group.id": f"ends-{uuid.uuid4().hex[:8]}",
        }
    )
    try:
        return end_offsets(consumer, topic)
    finally:
        consumer.close()


def read_to_end(
    bootstrap: str,
    topic: str,
    on_message: Callable[[Any], None],
    *,
    isolation: str = "read_committed",
    timeout_s: float = 120.0,
    settings: Mapping[str, Any] | None = None,
) -> int:
    """Read ``topic`` from its start to the end offsets it has now; return how many records.

    The partition-EOF events say where each partition's readable records end: its last offsets
    may be transaction markers or aborted records, which are never delivered. With
    ``isolation="read_uncommitted"`` records of aborted transactions are read too.

    Raises:
        BrokerError: a consume error, or the end not reached within ``timeout_s``.
    """
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": "false",
            "auto.offset.reset": "earliest",
            "isolation.level": isolation,
            "enable.partition.eof": "true",
            **(settings or {}),
        }
    )
    try:
        ends = end_offsets(consumer, topic)
        consumer.assign([TopicPartition(topic, p, 0) for p in ends])
        reached = {p: 0 if ends[p] else -1 for p in ends}
        count = 0
        deadline = time.monotonic() + timeout_s
        while any(reached[p] < ends[p] for p in ends):
            if time.monotonic() > deadline:
                raise BrokerError(f"read {count} records of {topic}, not its end {ends}")
            for msg in consumer.consume(1000, 0.5):
                err = msg.error()
                if err is not None and err.code() == KafkaError._PARTITION_EOF:
                    partition, offset = msg.partition(), msg.offset()
                    if partition is not None and offset is not None:
                        reached[partition] = offset
                elif err is not None:
                    raise BrokerError(f"reading {topic}: {err}", topic=topic)
                else:
                    on_message(msg)
                    count += 1
        return count
    finally:
        consumer.close()
