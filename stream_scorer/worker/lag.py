"""Lag in records and in seconds, as the worker sees it live (the metrics and the watchdog).

Definitions (docs/manual/observability.md, "Lag"), per partition:

- *lag in records*: the end offset (the last stable offset, i.e. the high watermark unless
  transactions are open) minus the committed offset; a partition without a committed offset
  counts from its low watermark (where ``auto.offset.reset = earliest`` starts).
- *lag in seconds*: 0 when the lag in records is 0, else now minus the Kafka timestamp of the
  oldest record not yet committed, i.e. the record at the committed offset.

The worker keeps the timestamp of the first record of each consumed batch per partition, where
commits land (they move a batch at a time), so while the record at the committed offset is in
flight its value is exact. When everything consumed is committed and the partition still has
lag, the next record has not been fetched yet; the worker then reports the time since it first
saw that lag (a lower bound, which keeps growing while the partition waits). The exact value,
with or without a worker, is ``stream_scorer.kafka.groups`` (the ``lag`` command).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import OFFSET_INVALID

from stream_scorer.kafka.topics import TP
from stream_scorer.stages.records import Message


@dataclass
class _Part:
    in_flight: deque[tuple[int, float]]  # (offset, timestamp in seconds), consume order
    committed: int = -1  # next offset to read per the last commit or store we know of
    end: int = -1  # last stable offset / high watermark per the last statistics
    low: int = -1
    position: int = -1  # next offset the consumer fetches, per the last statistics
    waiting_since: float | None = None  # lag > 0 with nothing in flight since then


class LagTracker:
    """The worker's per-partition view of its lag in records and seconds (thread-safe)."""

    def __init__(self) -> None:
        """Create an empty tracker."""
        self._parts: dict[TP, _Part] = {}
        self._lock = threading.Lock()

    def _part(self, tp: TP) -> _Part:
        part = self._parts.get(tp)
        if part is None:
            part = self._parts[tp] = _Part(deque())
        return part

    def consumed(self, batch: Sequence[Message]) -> None:
        """Record a consumed batch (batches in consume order): its first record per partition.

        Offsets are committed a batch at a time (``offsets.py``), so the record at a committed
        offset is always the first of some batch in its partition: only those are kept.
        """
        tps = [(m.topic() or "", m.partition() or 0) for m in batch]
        firsts = dict(zip(reversed(tps), reversed(batch), strict=True))
        with self._lock:
            for tp, msg in firsts.items():
                part = self._parts.get(tp) or self._part(tp)
                part.in_flight.append((msg.offset() or 0, msg.timestamp()[1] / 1000.0))

    def committed(self, topic: str, partition: int, next_offset: int) -> None:
        """Record that everything below ``next_offset`` is committed (or stored for commit)."""
        with self._lock:
            part = self._part((topic, partition))
            if next_offset > part.committed:
                part.committed = next_offset
            flight = part.in_flight
            while flight and flight[0][0] < next_offset:
                flight.popleft()

    def update_from_stats(self, stats: Mapping[str, Any], assigned: Iterable[TP]) -> None:
        """Take end offsets and committed offsets from a parsed librdkafka statistics document."""
        wanted = set(assigned)
        with self._lock:
            for topic, tdata in stats.get("topics", {}).items():
                for pid, pdata in tdata.get("partitions", {}).items():
                    tp = (topic, int(pid))
                    if tp not in wanted:
                        continue
                    part = self._part(tp)
                    ls, hi = int(pdata.get("ls_offset", -1)), int(pdata.get("hi_offset", -1))
                    end = ls if ls >= 0 else hi
                    if end >= 0:
                        part.end = end
                    position = int(pdata.get("next_offset", -1))
                    if position >= 0:
                        part.position = position
                    low = int(pdata.get("lo_offset", -1))
                    if low >= 0:
                        part.low = low
                    committed = int(pdata.get("committed_offset", OFFSET_INVALID))
                    if committed > part.committed:
                        part.committed = committed

    def forget(self, partitions: Iterable[TP]) -> None:
        """Drop partitions this worker no longer owns."""
        with self._lock:
            for tp in partitions:
                self._parts.pop(tp, None)

    def snapshot(self, now: float | None = None) -> dict[TP, tuple[int, int, float]]:
        """Return ``(committed offset, lag in records, lag in seconds)`` per known partition.

        Partitions whose end offset is not known yet (no statistics so far) are left out.
        """
        now = time.time() if now is None else now
        out: dict[TP, tuple[int, int, float]] = {}
        with self._lock:
            for tp, part in self._parts.items():
                if part.end < 0:
                    continue
                base = part.committed if part.committed >= 0 else part.low
                if base < 0:
                    continue
                lag = max(0, part.end - base)
                if lag and not part.in_flight and part.position >= part.end:
                    lag = 0  # fetched to the end, nothing left: only transaction markers remain
                if lag == 0:
                    part.waiting_since = None
                    seconds = 0.0
                elif part.in_flight:
                    part.waiting_since = None
                    seconds = max(0.0, now - part.in_flight[0][1])
                else:
                    part.waiting_since = part.waiting_since or now
                    seconds = now - part.waiting_since
                out[tp] = (base, lag, seconds)
        return out


# --- the lag command ---------------------------------------------------------------------
