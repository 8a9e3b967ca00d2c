"""Small Kafka client helpers shared by the worker, the tools, the demo, the benchmark and tests.

Produce with the bounded queue-full retry, a topic's end offsets, and "read a topic to its
end" — each written once here.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from confluent_kafka import Consumer, KafkaError, TopicPartition

from stream_scorer.errors import BrokerError

#: How long a producer's local queue may stay full before producing gives up (the worker uses
#: ``kafka.unreachable_timeout_s``: a queue that does not drain is a broker that does not take).
QUEUE_FULL_TIMEOUT_S = 120.0


def produce_retrying(
    producer: Any,
    topic: str,
    value: bytes | None,
    *,
    timeout_s: float = QUEUE_FULL_TIMEOUT_S,
    wait_s: float = 0.05,
    clock: Callable[[], float] = time.monotonic,
    **kwargs: Any,
) -> None:
    """``producer.produce(topic, value, **kwargs)``, serving the queue while it is full.

    Every producer's one queue-full loop: while ``produce`` raises ``BufferError`` (the local
    queue is full) the producer is polled (its delivery reports make room) for ``wait_s`` and
    asked again, for at most ``timeout_s`` from the first refusal. Other errors pass through.

    Raises:
        BrokerError: the queue stayed full for ``timeout_s``.
    """
    deadline: float | None = None
    while True:
        try:
            producer.produce(topic, value=value, **kwargs)
            return
        except BufferError:
            now = clock()
            deadline = now + timeout_s if deadline is None else deadline
            if now > deadline:
                raise BrokerError(
                    f"producer queue stayed full for {timeout_s:.0f} s", topic=topic
                ) from None
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
