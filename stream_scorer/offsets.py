"""Which offsets may be committed: a contiguous watermark per partition.

A record is *done* when the broker has acknowledged its prediction or its dead letter.
Acknowledgements arrive out of order, so for each partition we keep the offsets in flight in
consume order and move the watermark only across a run of done ones. The offset to commit is
the first one not yet done (Kafka's "next offset to read" convention).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

TopicPartition = tuple[str, int]


class _Partition:
    __slots__ = ("done", "in_flight", "next_commit")

    def __init__(self) -> None:
        self.in_flight: deque[int] = deque()
        self.done: set[int] = set()
        self.next_commit: int | None = None


class OffsetTracker:
    """Tracks consumed-but-undelivered records and the offsets safe to commit."""

    def __init__(self) -> None:
        """Create an empty tracker."""
        self._parts: dict[TopicPartition, _Partition] = {}
        self._dirty: set[TopicPartition] = set()

    def track(self, topic: str, partition: int, offset: int) -> None:
        """Record that ``offset`` was consumed; call in consume order per partition."""
        self._parts.setdefault((topic, partition), _Partition()).in_flight.append(offset)

    def ack(self, topic: str, partition: int, offset: int) -> None:
        """Record that ``offset``'s output was acknowledged by the broker."""
        part = self._parts.get((topic, partition))
        if part is None:  # partition revoked since; its offsets are no longer ours to commit
            return
        part.done.add(offset)
        flight = part.in_flight
        moved = False
        while flight and flight[0] in part.done:
            part.done.discard(flight[0])
            part.next_commit = flight.popleft() + 1
            moved = True
        if moved:
            self._dirty.add((topic, partition))

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
            self._parts.pop(tp, None)
            self._dirty.discard(tp)

    @property
    def pending(self) -> int:
        """How many consumed records still wait for their acknowledgement."""
        return sum(len(p.in_flight) for p in self._parts.values())
