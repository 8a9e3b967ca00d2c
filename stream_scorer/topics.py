"""Topic administration shared by the demo, the tests and operators' scripts."""

from __future__ import annotations

import time
from collections.abc import Mapping

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from tenacity import retry, retry_if_exception, stop_after_delay, wait_exponential

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


_COORDINATOR_CODES = frozenset(
    {
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError._TIMED_OUT,
    }
)


def _retriable(exc: BaseException) -> bool:
    if not isinstance(exc, KafkaException):
        return False
    err = exc.args[0]
    return bool(err.retriable()) or err.code() in _COORDINATOR_CODES


@retry(
    retry=retry_if_exception(_retriable),
    wait=wait_exponential(multiplier=0.1, max=2.0),
    stop=stop_after_delay(30),
    reraise=True,
)
def group_lag(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """Return, per partition of ``topic``, the high watermark minus ``group``'s committed offset.

    A partition the group never committed counts from offset 0. Retries while the group
    coordinator is loading or moving (a fresh broker), for at most 30 s.
    """
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        committed = consumer.committed([TopicPartition(topic, p) for p in parts], timeout=10)
        lag = {}
        for tp in committed:
            _low, high = consumer.get_watermark_offsets(tp, timeout=10)
            lag[tp.partition] = high - max(tp.offset, 0)
        return lag
    finally:
        consumer.close()
