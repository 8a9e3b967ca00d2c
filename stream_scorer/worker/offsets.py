"""Which offsets may be committed: a contiguous watermark per partition, moved a batch at a time.

A batch's records of one partition (a ``Span``) are *done* when the broker has acknowledged
every one of their outputs (one prediction or one dead letter per record). Spans finish out of
order, so for each partition we keep them in consume order and move the watermark only across
a run of done ones: a record whose output is not acknowledged holds back its own partition's
commits from the start of its batch on, and no other partition's. The offset to commit is the
first one not yet done (Kafka's "next offset to read" convention).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable, Sequence

from stream_scorer.stages.records import Message

TopicPartition = tuple[str, int]
#: Partitions handed over or taken away in a rebalance.
Partitions = list[TopicPartition]
#: ``(topic, partition, next offset)``: what is stored or committed for a partition.
Position = tuple[str, int, int]


class Span:
    """One batch's records of one partition: done when all their outputs are acknowledged.

    Attributes:
        topic: the input topic.
        partition: the input partition.
        next_offset: the offset after the batch's last record in this partition.
        records: how many of the batch's records are in this partition.
        done: every one of their outputs was acknowledged.
    """

    __slots__ = ("done", "next_offset", "partition", "records", "topic")

    def __init__(self, topic: str, partition: int, next_offset: int, records: int) -> None:
        """Describe a batch's records in one partition."""
        self.topic = topic
        self.partition = partition
        self.next_offset = next_offset
        self.records = records
        self.done = False


class Ticket:
    """One consumed batch: a ``Span`` per partition it read from."""

    __slots__ = ("spans",)

    def __init__(self, positions: list[tuple[str, int, int, int]]) -> None:
        """Describe a batch by its positions (``batch_positions``)."""
        self.spans = {(t, p): Span(t, p, o, n) for t, p, o, n in positions}

    @property
    def next_offsets(self) -> list[tuple[str, int, int]]:
        """``(topic, partition, next offset)`` per partition: what committing the batch stores."""
        return [(s.topic, s.partition, s.next_offset) for s in self.spans.values()]


def batch_positions(batch: Sequence[Message]) -> list[tuple[str, int, int, int]]:
    """``(topic, partition, last offset + 1, records)`` per partition of ``batch``, sorted.

    Records of one partition arrive in offset order, so the last one seen is the highest.
    """
    tps = [(m.topic() or "", m.partition() or 0) for m in batch]
    last = dict(zip(tps, [m.offset() or 0 for m in batch], strict=True))
    counts = Counter(tps)
    return [(t, p, last[(t, p)] + 1, counts[(t, p)]) for t, p in sorted(last)]


class _Partition:
    __slots__ = ("in_flight", "next_commit")

    def __init__(self) -> None:
        self.in_flight: deque[Span] = deque()  # in consume order
        self.next_commit: int | None = None


class OffsetTracker:
    """Tracks consumed-but-undelivered batches and the offsets safe to commit."""

    def __init__(self) -> None:
        """Create an empty tracker."""
        self._parts: dict[TopicPartition, _Partition] = {}
        self._dirty: set[TopicPartition] = set()
        self._pending = 0

    def track(self, batch: Sequence[Message]) -> Ticket:
        """Record that ``batch`` was consumed; call in consume order. Acknowledge its spans."""
        ticket = Ticket(batch_positions(batch))
        for tp, span in ticket.spans.items():
            self._parts.setdefault(tp, _Partition()).in_flight.append(span)
            self._pending += span.records
        return ticket

    def ack(self, span: Span) -> None:
        """Record that every output of ``span``'s records was acknowledged by the broker."""
        span.done = True
        tp = (span.topic, span.partition)
        part = self._parts.get(tp)
        if part is None:  # partition revoked since; its offsets are no longer ours to commit
            return
        flight = part.in_flight
        if not flight or not flight[0].done:
            return
        while flight and flight[0].done:
            head = flight.popleft()
            part.next_commit = head.next_offset
            self._pending -= head.records
        self._dirty.add(tp)

    def take_committable(self) -> list[tuple[str, int, int]]:
        """Return ``(topic, partition, next_offset)`` for partitions whose watermark moved."""
        out = []
        for tp in sorted(self._dirty):
            part = self._parts.get(tp)
            if part is not None and part.next_commit is not None:
                out.append((tp[0], tp[1], part.next_commit))
        self._dirty.clear()
        return out

    def committable(self, partitions: Iterable[TopicPartition]) -> list[tuple[str, int, int]]:
        """Return the current watermark of each of ``partitions`` that has one."""
        out = []
        for tp in partitions:
            part = self._parts.get(tp)
            if part is not None and part.next_commit is not None:
                out.append((tp[0], tp[1], part.next_commit))
        return out

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Drop revoked or lost partitions; late acknowledgements for them are ignored."""
        for tp in partitions:
            part = self._parts.pop(tp, None)
            if part is not None:
                self._pending -= sum(span.records for span in part.in_flight)
            self._dirty.discard(tp)

    @property
    def pending(self) -> int:
        """How many consumed records still wait for their acknowledgement."""
        return self._pending
