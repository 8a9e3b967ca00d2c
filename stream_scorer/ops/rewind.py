"""``stream-scorer rewind``: move a stopped group's committed offsets back to a point in time.

The recovery after a bad model or a bad deploy: roll the model back, stop the workers, rewind
their group to when things went wrong, start them again, and they score that window again.
Each partition's new offset is that of the first record whose timestamp is at or after the time
(``offsets_for_times``); with no such record, the partition's end offset. The broker only lets
a group's offsets be changed while the group has no members, so the command refuses (and names
them) while any worker is in the group. docs/manual/recovery.md.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import (
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from stream_scorer.errors import BrokerError, ConfigError, GroupActiveError
from stream_scorer.kafka.groups import (
    _ask_coordinator,
    _committed_offsets,
    _group_partitions,
    group_members,
    naming_brokers,
    topic_partitions,
)
from stream_scorer.kafka.topics import TP
from stream_scorer.logs import client_logger

_RDKAFKA_LOG = client_logger("rewind")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")

#: Notes on a partition's line (``PartitionRewind.note``).
BEYOND_END = "no record at or after the time: the end offset"
LOG_START = "the log starts later (retention deleted older records): its first record"


@dataclass(frozen=True)
class PartitionRewind:
    """One partition's line of ``stream-scorer rewind``.

    Attributes:
        topic: the topic.
        partition: the partition.
        before: the group's committed offset before (None: never committed).
        after: the committed offset after (planned, with ``--dry-run``).
        low: the partition's low watermark (its first record still stored).
        end: the partition's high watermark (the next offset to be written).
        again: records the group will read again (``before - after`` when it moves back).
        skipped: unread records the group will skip (``after - before`` when it moves on).
        note: why ``after`` is not a record at the time (``BEYOND_END``, ``LOG_START``), or "".
    """

    topic: str
    partition: int
    before: int | None
    after: int
    low: int
    end: int
    again: int
    skipped: int
    note: str


@dataclass(frozen=True)
class RewindReport:
    """What ``rewind`` did (or, with ``dry_run``, would do).

    Attributes:
        group: the consumer group.
        to_ms: the time, in epoch milliseconds.
        dry_run: True when nothing was changed.
        partitions: one line per partition, sorted by topic and partition.
        members: the group's members when the plan was made (a dry run allows them; the real
            rewind is refused while there are any).
    """

    group: str
    to_ms: int
    dry_run: bool
    partitions: list[PartitionRewind]
    members: list[str]


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``90s``, ``15m``, ``2h``, ``1h30m``, ``1d`` or ``500ms``.

    Raises:
        ConfigError: (``--by``) the text is not one or more number-unit pairs.
    """
    compact = text.strip().replace(" ", "")
    if not compact or _DURATION.sub("", compact):
        raise ConfigError("--by", f"not a duration like 90s, 15m, 2h, 1h30m or 1d: {text!r}")
    return sum(float(n) * _UNITS[unit] for n, unit in _DURATION.findall(compact))


def active_members(admin: AdminClient, group: str, timeout: float) -> list[str]:
    """The group's members, one description each (client id, member id, host); [] if none."""
    return [
        f"{m.client_id} (member {m.member_id}, host {m.host.lstrip('/')})"
        for m in group_members(admin, group, timeout)
    ]


def _partitions(
    admin: AdminClient, group: str, topics: Sequence[str], timeout: float
) -> dict[TP, int | None]:
    """Every partition of ``topics`` (default: the group's) with its committed offset or None."""
    if not topics:
        return _group_partitions(admin, group, timeout)
    tps = [tp for topic in topics for tp in topic_partitions(admin, topic, timeout)]
    return _committed_offsets(admin, group, tps, timeout)


def _targets(
    settings: Mapping[str, str], committed: Mapping[TP, int | None], to_ms: int, timeout: float
) -> list[PartitionRewind]:
    """Each partition's first offset at or after ``to_ms`` (or its end), with its watermarks."""
    probe = Consumer(
        {
            "log_level": "4",
            "logger": _RDKAFKA_LOG,
            **settings,
            "group.id": f"stream-scorer-rewind-{uuid.uuid4().hex[:8]}",  # never joined
            "enable.auto.commit": "false",
        }
    )
    try:
        asked = [TopicPartition(t, p, to_ms) for t, p in sorted(committed)]
        try:
            found = probe.offsets_for_times(asked, timeout=timeout)
            marks = {
                tp: probe.get_watermark_offsets(TopicPartition(*tp), timeout) for tp in committed
            }
        except KafkaException as exc:
            raise BrokerError(f"cannot look up offsets by time: {exc}") from exc
    finally:
        probe.close()
    rows = []
    for tp in found:
        key = (tp.topic, tp.partition)
        if tp.error is not None:
            raise BrokerError(f"cannot look up offsets by time: {tp.error}", topic=tp.topic)
        low, end = marks[key]
        note = ""
        after = tp.offset
        if after < 0:  # librdkafka's OFFSET_END: no record at or after the time
            after, note = end, BEYOND_END
        elif after == low and low > 0:
            note = LOG_START
        before = committed[key]
        start = low if before is None else before
        again, skipped = max(0, start - after), max(0, after - start)
        rows.append(PartitionRewind(*key, before, after, low, end, again, skipped, note))
    return rows


def rewind(
    settings: Mapping[str, str],
    group: str,
    to_ms: int,
    topics: Sequence[str] = (),
    *,
    dry_run: bool = False,
    timeout: float = 15.0,
) -> RewindReport:
    """Move ``group``'s committed offsets to the first record at or after ``to_ms``.

    Args:
        settings: librdkafka client settings (at least ``bootstrap.servers``; security too).
        group: the consumer group; it must have no members (its workers stopped).
        to_ms: the time, in epoch milliseconds.
        topics: only these topics (every partition of each); default: every topic the group
            has committed offsets for.
        dry_run: compute and return the plan, change nothing (members are allowed).
        timeout: seconds for each broker request.

    Returns:
        The report; its ``after`` offsets are read back from the broker after the change.

    Raises:
        GroupActiveError: the group has members (named); nothing was changed.
        BrokerError: the broker does not answer or refuses; a topic does not exist; without
            ``topics``, the group has no committed offsets.
    """
    with naming_brokers(settings):
        admin_settings: dict[str, Any] = {"log_level": "4", "logger": _RDKAFKA_LOG, **settings}
        admin = AdminClient(admin_settings)
        members = active_members(admin, group, timeout)
        if members and not dry_run:
            raise GroupActiveError(group, members)
        committed = _partitions(admin, group, topics, timeout)
        rows = _targets(settings, committed, to_ms, timeout)
        if dry_run:
            return RewindReport(group, to_ms, True, rows, members)
        request = [
            ConsumerGroupTopicPartitions(
                group, [TopicPartition(r.topic, r.partition, r.after) for r in rows]
            )
        ]
        try:
            result = _ask_coordinator(
                lambda: admin.alter_consumer_group_offsets(request, request_timeout=timeout)[group],
                group,
                "offsets",
                timeout,
            )
        except BrokerError as exc:
            cause = exc.__cause__ or exc
            raise BrokerError(
                f"the broker refused to change the offsets of group {group!r} (did a member join "
                f"since the check?): {cause}"
            ) from exc
        for tp in result.topic_partitions:
            if tp.error is not None:
                raise BrokerError(
                    f"the broker refused to change the offsets of group {group!r} (did a member "
                    f"join since the check?): {tp.error}",
                    topic=tp.topic,
                    partition=tp.partition,
                    offset=tp.offset,
                )
        now = _committed_offsets(
            admin, group, [TopicPartition(r.topic, r.partition) for r in rows], timeout
        )
        changed = [r for r in rows if now.get((r.topic, r.partition)) != r.after]
        if changed:
            raise BrokerError(
                f"group {group!r}: the committed offsets read back differ from those set "
                f"(a member joined meanwhile?): "
                + ", ".join(f"{r.topic}/{r.partition}" for r in changed)
            )
        return RewindReport(group, to_ms, False, rows, [])


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def totals(report: RewindReport) -> dict[str, int]:
    """Records to be read again and unread records skipped, over every partition."""
    return {
        "partitions": len(report.partitions),
        "again": sum(r.again for r in report.partitions),
        "skipped": sum(r.skipped for r in report.partitions),
    }


def to_json(report: RewindReport) -> str:
    """The ``--json`` output: the group, the time, one object per partition, the totals."""
    doc = asdict(report)
    doc["to"] = _iso(report.to_ms)
    doc["total"] = totals(report)
    return json.dumps(doc)


def to_table(report: RewindReport) -> str:
    """The default output: before and after per partition, then the totals."""
    head = ("TOPIC", "PARTITION", "BEFORE", "AFTER", "END", "AGAIN", "SKIPPED", "NOTE")
    lines = [head]
    for r in report.partitions:
        before = "-" if r.before is None else str(r.before)
        cells = (r.topic, str(r.partition), before, str(r.after), str(r.end))
        lines.append((*cells, str(r.again), str(r.skipped), r.note))
    tot = totals(report)
    lines.append(("TOTAL", "", "", "", "", str(tot["again"]), str(tot["skipped"]), ""))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    verb = "would move (dry run: nothing changed)" if report.dry_run else "moved"
    out = [
        f"GROUP {report.group}: committed offsets {verb} to the first record at or after "
        f"{_iso(report.to_ms)}"
    ]
    for line in lines:
        out.append("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    if report.members:
        out.append(
            f"the group has {len(report.members)} active member(s), so the rewind itself would be "
            f"refused: {'; '.join(report.members)}"
        )
    return "\n".join(out)
