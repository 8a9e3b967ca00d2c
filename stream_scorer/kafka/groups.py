"""A consumer group as the broker sees it: members, committed offsets, exact lag, orphaned lag.

The group's committed offsets (admin API) and the watermarks, then the record at each committed
offset read by a separate ``assign()``-ed consumer that never joins the group. Shared by the
``lag`` and ``rewind`` commands (``stream_scorer.ops``) and the worker's idle stop
(``orphaned_lag``). Definitions: docs/manual/observability.md, "Lag" (and
``stream_scorer.worker.lag``).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from stream_scorer.errors import BrokerError
from stream_scorer.kafka.topics import TP, kafka_busy
from stream_scorer.logs import client_logger
from stream_scorer.retry import retrying

log = logging.getLogger(__name__)
_RDKAFKA_LOG = client_logger("lag")


@dataclass(frozen=True)
class PartitionLag:
    """One line of ``stream-scorer lag``.

    Attributes:
        topic: the topic.
        partition: the partition.
        committed: the group's committed offset (None: the group never committed here).
        low: the low watermark (first offset still stored).
        high: the high watermark (next offset to be written).
        lag_records: ``high`` minus ``committed`` (minus ``low`` when never committed).
        lag_seconds: now minus the timestamp of the record at the committed offset, 0 without
            lag; None when that record could not be read.
        oldest_timestamp_ms: the timestamp of that record (None when not read or no lag).
    """

    topic: str
    partition: int
    committed: int | None
    low: int
    high: int
    lag_records: int
    lag_seconds: float | None
    oldest_timestamp_ms: int | None


@contextmanager
def naming_brokers(settings: Mapping[str, Any]) -> Iterator[None]:
    """Add the brokers' address to a ``BrokerError`` raised inside that does not name it.

    A wrong address shows as a timeout; the message then says which address did not answer.
    """
    try:
        yield
    except BrokerError as exc:
        where = str(settings.get("bootstrap.servers", ""))
        if where and where not in str(exc):
            exc.args = (f"{exc} (brokers at {where})", *exc.args[1:])
        raise


def _ask_coordinator(ask: Callable[[], Future[Any]], group: str, what: str, timeout: float) -> Any:
    """The result of an admin request about ``group``, retried while its coordinator loads.

    Raises:
        BrokerError: no answer within ``timeout``, or a refusal.
    """

    def once() -> Any:
        try:
            return ask().result(timeout=timeout)
        except TimeoutError as exc:
            raise BrokerError(f"no answer about group {group!r} within {timeout:g} s") from exc

    try:  # retried while the coordinator is loading (an outage), up to ``timeout``
        return retrying(timeout, f"the {what} of group {group!r}", outage=kafka_busy)(once)
    except KafkaException as exc:
        err = exc.args[0] if exc.args else exc
        raise BrokerError(f"cannot read the {what} of group {group!r}: {err}") from exc


def _committed_offsets(
    admin: AdminClient, group: str, request_tps: list[TopicPartition] | None, timeout: float
) -> dict[TP, int | None]:
    """The group's committed offsets (None: not committed) of ``request_tps`` or of all."""
    from confluent_kafka import ConsumerGroupTopicPartitions

    request = [ConsumerGroupTopicPartitions(group, request_tps)]
    result = _ask_coordinator(
        lambda: admin.list_consumer_group_offsets(request, request_timeout=timeout)[group],
        group,
        "offsets",
        timeout,
    )
    out: dict[TP, int | None] = {}
    for tp in result.topic_partitions:
        out[(tp.topic, tp.partition)] = tp.offset if tp.offset >= 0 else None
    return out


def group_members(admin: AdminClient, group: str, timeout: float) -> list[Any]:
    """The group's members (``MemberDescription``); [] when it has none or does not exist."""
    try:
        desc = _ask_coordinator(
            lambda: admin.describe_consumer_groups([group], request_timeout=timeout)[group],
            group,
            "members",
            timeout,
        )
    except BrokerError as exc:
        err = exc.__cause__.args[0] if isinstance(exc.__cause__, KafkaException) else None
        if isinstance(err, KafkaError) and err.code() == KafkaError.GROUP_ID_NOT_FOUND:
            return []
        raise
    return list(desc.members)


def _assigned_topics(admin: AdminClient, group: str, timeout: float) -> set[str]:
    """The topics of the group's members' current assignments (none: no members)."""
    return {
        tp.topic
        for member in group_members(admin, group, timeout)
        if member.assignment is not None
        for tp in member.assignment.topic_partitions
    }


def topic_partitions(admin: AdminClient, topic: str, timeout: float) -> list[TopicPartition]:
    """Every partition of ``topic``, in order.

    Raises:
        BrokerError: the metadata cannot be read, or the topic does not exist.
    """
    try:
        meta = admin.list_topics(topic, timeout=timeout).topics.get(topic)
    except KafkaException as exc:
        raise BrokerError(f"cannot read the topic's metadata: {exc}", topic=topic) from exc
    if meta is None or meta.error is not None:
        raise BrokerError(f"no such topic: {meta.error if meta else ''}", topic=topic)
    return [TopicPartition(topic, p) for p in sorted(meta.partitions)]


def _group_partitions(admin: AdminClient, group: str, timeout: float) -> dict[TP, int | None]:
    """Every partition of every topic ``group`` consumes, with its committed offset or None.

    The topics are those of the members' current assignments and those the group has committed
    offsets for; every partition of each, committed or not.

    Raises:
        BrokerError: the group does not exist (no members, no committed offsets), or the broker
            does not answer.
    """
    committed = _committed_offsets(admin, group, None, timeout)
    topics = {t for t, _p in committed} | _assigned_topics(admin, group, timeout)
    if not topics:
        raise BrokerError(
            f"group {group!r} does not exist: it has no members and no committed offsets"
        )
    try:
        listed = admin.list_topics(timeout=timeout).topics
    except KafkaException as exc:
        raise BrokerError(f"cannot read the topics' metadata: {exc}") from exc
    out: dict[TP, int | None] = {}
    for name in sorted(topics):
        meta = listed.get(name)
        if meta is None or meta.error is not None:
            log.warning("group %r has offsets for topic %r, which no longer exists", group, name)
            continue
        for partition in sorted(meta.partitions):
            out[(name, partition)] = committed.get((name, partition))
    return out


def describe_group(
    settings: Mapping[str, str],
    group: str,
    topic: str | None = None,
    *,
    timeout: float = 15.0,
    now: float | None = None,
) -> list[PartitionLag]:
    """Return the lag of ``group`` per partition, without joining the group.

    Args:
        settings: librdkafka client settings (at least ``bootstrap.servers``; security too).
        group: the consumer group.
        topic: only this topic (all its partitions); default: every partition of every topic
            the group consumes (its members' assignments and its committed offsets), those
            without a committed offset counted from the low watermark.
        timeout: seconds for each broker request and for reading the oldest records.
        now: the reference time (default: when the oldest records have been read).

    Raises:
        BrokerError: the broker does not answer or refuses; the topic does not exist; without
            ``topic``, the group does not exist (no members and no committed offsets).
    """
    with naming_brokers(settings):
        # librdkafka's own lines (warnings and worse) through Python logging
        admin_settings: dict[str, Any] = {"log_level": "4", "logger": _RDKAFKA_LOG, **settings}
        admin = AdminClient(admin_settings)
        if topic is None:
            committed = _group_partitions(admin, group, timeout)
        else:
            tps = topic_partitions(admin, topic, timeout)
            committed = _committed_offsets(admin, group, tps, timeout)
        probe = Consumer(
            {
                "log_level": "4",
                "logger": _RDKAFKA_LOG,
                **settings,
                "group.id": f"stream-scorer-lag-{uuid.uuid4().hex[:8]}",  # never joined: assign()
                "enable.auto.commit": "false",
                "enable.partition.eof": "false",
                "isolation.level": "read_uncommitted",
            }
        )
        try:
            marks: dict[TP, tuple[int, int]] = {}
            for tp in sorted(committed):
                try:
                    marks[tp] = probe.get_watermark_offsets(TopicPartition(*tp), timeout=timeout)
                except KafkaException as exc:
                    raise BrokerError(f"cannot read watermarks: {exc}", topic=tp[0]) from exc
            starts: dict[TP, int] = {}
            for tp, (low, high) in marks.items():
                start = committed[tp]
                start = low if start is None else max(start, low)
                if start < high:
                    starts[tp] = start
            oldest = _read_first(probe, starts, {tp: marks[tp][1] for tp in starts}, timeout)
        finally:
            probe.close()
        now = time.time() if now is None else now
        rows = []
        for tp in sorted(committed):
            low, high = marks[tp]
            done = committed[tp]
            base = low if done is None else done
            lag = max(0, high - base)
            ts = oldest.get(tp) if lag else None
            if lag == 0 or (tp in oldest and ts is None):  # no record: transaction markers only
                seconds: float | None = 0.0
            else:
                seconds = None if ts is None else max(0.0, now - ts / 1000.0)
            rows.append(PartitionLag(tp[0], tp[1], committed[tp], low, high, lag, seconds, ts))
        return rows


#: How long ``orphaned_lag`` watches the group's committed offsets for progress: over two
#: auto-commit intervals (at-least-once members commit every second, exactly-once ones every
#: batch).
ORPHAN_WATCH_S = 2.5


@dataclass(frozen=True)
class OrphanedLag:
    """Records left in partitions nobody consumes (``orphaned_lag``); JSON in the report."""

    records: int
    partitions: list[str]  # "topic[partition]"

    def __bool__(self) -> bool:
        """True when there are any."""
        return bool(self.partitions)


def orphaned_lag(
    settings: Mapping[str, str],
    group: str,
    own: Collection[TP],
    *,
    watch_s: float = ORPHAN_WATCH_S,
    timeout: float = 15.0,
    wait: Callable[[float], object] = time.sleep,
) -> OrphanedLag:
    """The lag of ``group`` on partitions no live member works on, seen by a stopping member.

    A partition counts when it has records left to consume (not just transaction markers),
    is not one of ``own`` (the asking member's), and its committed offset did not move over
    ``watch_s``: a member killed without leaving keeps its partitions until its
    ``session.timeout.ms`` runs out, and whoever stops before then leaves their records behind.

    Raises:
        BrokerError: the broker does not answer or refuses.
    """
    before = {
        (r.topic, r.partition): r.committed
        for r in describe_group(settings, group, timeout=timeout)
    }
    wait(watch_s)
    rows = [
        r
        for r in describe_group(settings, group, timeout=timeout)
        if (r.topic, r.partition) not in own
        and r.lag_records > 0
        and not (r.lag_seconds == 0.0 and r.oldest_timestamp_ms is None)  # markers only
        and before.get((r.topic, r.partition), -1) == r.committed
    ]
    return OrphanedLag(
        sum(r.lag_records for r in rows), [f"{r.topic}[{r.partition}]" for r in rows]
    )


def _read_first(
    consumer: Any, starts: Mapping[TP, int], ends: Mapping[TP, int], timeout: float
) -> dict[TP, int | None]:
    """Read the first record at or after each start offset; return its timestamp in ms.

    None for a partition read up to ``ends`` without a record (only transaction markers);
    partitions not read within ``timeout`` are left out.
    """
    if not starts:
        return {}
    consumer.assign([TopicPartition(t, p, o) for (t, p), o in starts.items()])
    found: dict[TP, int | None] = {}
    deadline = time.monotonic() + timeout
    while len(found) < len(starts) and time.monotonic() < deadline:
        for msg in consumer.consume(num_messages=len(starts) * 10, timeout=0.5):
            if msg.error() is not None:
                continue
            tp = (msg.topic() or "", msg.partition() or 0)
            if tp in starts and tp not in found and (msg.offset() or 0) >= starts[tp]:
                found[tp] = msg.timestamp()[1]
                consumer.pause([TopicPartition(*tp)])
        pending = [TopicPartition(*tp) for tp in starts if tp not in found]
        for tp in consumer.position(pending) if pending else []:
            if tp.offset >= ends[(tp.topic, tp.partition)]:
                found[(tp.topic, tp.partition)] = None
    return found
