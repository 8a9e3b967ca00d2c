"""``stream-scorer dlq replay``: publish dead letters again, once.

Reads the dead-letter topic from where the replay's own consumer group left off up to the end
offsets seen at start, keeps the dead letters that match the filter (reasons, a time range of
the dead letter's timestamp), and publishes each with its original key, value and headers (the
error context headers dropped; ``stream_scorer.replay.source`` and ``stream_scorer.attempt``
added) to the target topic, at a bounded rate.

Safe to run twice: every batch of replayed records and the dead-letter offsets it consumed
commit in one Kafka transaction, under a consumer group derived from the target and the filter.
A second run of the same command finds nothing left; a crash mid-way resumes without repeats.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from stream_scorer import headers as hdr
from stream_scorer.errors import BrokerError, ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplayFilter:
    """Which dead letters to replay.

    Attributes:
        reasons: reason codes to replay (empty: all).
        since_ms: only dead letters written at or after this time (ms since the epoch).
        until_ms: only dead letters written before this time.
    """

    reasons: frozenset[str] = frozenset()
    since_ms: int | None = None
    until_ms: int | None = None

    def matches(self, headers: Mapping[str, bytes], timestamp_ms: int) -> bool:
        """Whether a dead letter with these headers and timestamp is to be replayed."""
        if self.reasons and headers.get(hdr.REASON, b"").decode() not in self.reasons:
            return False
        if self.since_ms is not None and timestamp_ms < self.since_ms:
            return False
        return self.until_ms is None or timestamp_ms < self.until_ms


@dataclass
class ReplayReport:
    """What a replay did."""

    group: str
    scanned: int = 0
    replayed: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)


def replay_headers(
    headers: Sequence[tuple[str, bytes | None]], source: str
) -> list[tuple[str, bytes | None]]:
    """The original headers without the error context, plus the replay's own."""
    kept = [
        (k, v)
        for k, v in headers
        if (not k.startswith(hdr.CONNECT_PREFIX) and not k.startswith(hdr.OWN_PREFIX))
        or k == hdr.ATTEMPT
    ]
    attempt = 1
    for k, v in kept:
        if k == hdr.ATTEMPT and v:
            attempt = int(v.decode() or 1)
    out = [(k, v) for k, v in kept if k != hdr.ATTEMPT]
    out.append((hdr.ATTEMPT, str(attempt + 1).encode()))
    out.append((hdr.REPLAY_SOURCE, source.encode()))
    return out


def default_group(dead_letter_topic: str, target: str, flt: ReplayFilter) -> str:
    """The replay's consumer group: one per (dead-letter topic, target, filter)."""
    key = f"{dead_letter_topic}|{target}|{sorted(flt.reasons)}|{flt.since_ms}|{flt.until_ms}"
    return f"stream-scorer-replay-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def replay(
    bootstrap: str,
    dead_letter_topic: str,
    target: str,
    flt: ReplayFilter,
    *,
    rate: float | None = None,
    group: str | None = None,
    client: Mapping[str, str] | None = None,
    batch: int = 500,
    timeout_s: float = 60.0,
) -> ReplayReport:
    """Replay matching dead letters of ``dead_letter_topic`` to ``target``; see the module doc.

    Raises:
        ConfigError: a bad rate or batch.
        BrokerError: the broker refused or did not answer.
    """
    if rate is not None and rate <= 0:
        raise ConfigError("--rate", "must be greater than 0")
    group = group or default_group(dead_letter_topic, target, flt)
    report = ReplayReport(group)
    common = {"bootstrap.servers": bootstrap, **(client or {})}
    consumer = Consumer(
        {
            **common,
            "group.id": group,
            "enable.auto.commit": "false",
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "enable.partition.eof": "true",
        }
    )
    producer = Producer(
        {**common, "transactional.id": f"{group}-{uuid.uuid4().hex[:8]}", "linger.ms": "5"}
    )
    try:
        producer.init_transactions(timeout_s)
        ends = _assign_from_committed(consumer, dead_letter_topic, timeout_s)
        started = time.monotonic()
        done = {p for p, (position, end) in ends.items() if position >= end}
        while len(done) < len(ends):
            msgs = consumer.consume(batch, 1.0)
            chosen: list[Any] = []
            last: dict[int, int] = {}
            for msg in msgs:
                err = msg.error()
                part, offset = msg.partition() or 0, msg.offset() or 0
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        done.add(part)
                        continue
                    raise BrokerError(f"reading {dead_letter_topic}: {err}")
                end = ends[part][1]
                if offset >= end:
                    done.add(part)
                    continue
                last[part] = offset
                report.scanned += 1
                headers = _headers(msg)
                if flt.matches(headers, msg.timestamp()[1]):
                    chosen.append(msg)
                if offset + 1 >= end:
                    done.add(part)
            if last:
                _publish(producer, consumer, target, chosen, last, dead_letter_topic, timeout_s)
                for msg in chosen:
                    reason = _headers(msg).get(hdr.REASON, b"?").decode(errors="replace")
                    report.by_reason[reason] = report.by_reason.get(reason, 0) + 1
                report.replayed += len(chosen)
            if rate:
                ahead = report.replayed / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)  # the rate limit
    except KafkaException as exc:
        raise BrokerError(f"replay failed: {exc}", topic=dead_letter_topic) from exc
    finally:
        consumer.close()
    return report


def _headers(msg: Any) -> dict[str, bytes]:
    return {str(k): bytes(v or b"") for k, v in msg.headers() or []}


def _assign_from_committed(
    consumer: Any, topic: str, timeout_s: float
) -> dict[int, tuple[int, int]]:
    """Assign every partition at the group's committed offset; return (start, end) each."""
    meta = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
    if meta is None or meta.error is not None:
        raise BrokerError(f"no such dead-letter topic: {topic}", topic=topic)
    tps = [TopicPartition(topic, p) for p in sorted(meta.partitions)]
    committed = consumer.committed(tps, timeout=timeout_s)
    ranges: dict[int, tuple[int, int]] = {}
    assign = []
    for tp in committed:
        low, high = consumer.get_watermark_offsets(
            TopicPartition(topic, tp.partition), timeout=timeout_s
        )
        start = max(tp.offset, low) if tp.offset >= 0 else low
        ranges[tp.partition] = (start, high)
        assign.append(TopicPartition(topic, tp.partition, start))
    consumer.assign(assign)
    return ranges


def _publish(
    producer: Any,
    consumer: Any,
    target: str,
    chosen: list[Any],
    last: dict[int, int],
    topic: str,
    timeout_s: float,
) -> None:
    """One transaction: the chosen records and the consumed dead-letter offsets."""
    producer.begin_transaction()
    for msg in chosen:
        source = f"{msg.topic()}/{msg.partition()}/{msg.offset()}"
        producer.produce(
            target,
            value=msg.value(),
            key=msg.key(),
            headers=replay_headers(msg.headers() or [], source),
        )
    offsets = [TopicPartition(topic, p, o + 1) for p, o in sorted(last.items())]
    producer.send_offsets_to_transaction(offsets, consumer.consumer_group_metadata(), timeout_s)
    producer.commit_transaction(timeout_s)
