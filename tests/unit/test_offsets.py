from __future__ import annotations

import pytest

from stream_scorer.stages.records import PlainMessage
from stream_scorer.worker.offsets import OffsetTracker, Ticket, batch_positions


def batch(*coords: tuple[int, int]) -> list[PlainMessage]:
    return [PlainMessage(None, t="t", p=p, o=o) for p, o in coords]


def ack(tracker: OffsetTracker, ticket: Ticket, *partitions: int) -> None:
    """Acknowledge the ticket's spans of ``partitions`` (default: all)."""
    for (_, p), span in ticket.spans.items():
        if not partitions or p in partitions:
            tracker.ack(span)


@pytest.mark.parametrize(
    ("batches", "acked", "expected"),
    [
        ([[0, 1, 2]], [0], [("t", 0, 3)]),
        ([[0, 1], [2, 3], [4]], [1, 2], []),  # batch 0 not delivered: nothing may be committed
        ([[0, 1], [2, 3], [4]], [0, 2], [("t", 0, 2)]),
        ([[0, 1], [2, 3], [4]], [2, 1, 0], [("t", 0, 5)]),  # out of order
        ([[5, 6], [9]], [1, 0], [("t", 0, 10)]),  # gaps in offsets (compaction)
    ],
)
def test_watermark_moves_across_a_run_of_done_batches(
    batches: list[list[int]], acked: list[int], expected: list[tuple[str, int, int]]
) -> None:
    tracker = OffsetTracker()
    tickets = [tracker.track(batch(*((0, o) for o in offsets))) for offsets in batches]
    for i in acked:
        ack(tracker, tickets[i])
    assert tracker.take_committable() == expected
    assert tracker.take_committable() == []  # reported once
    released = 0  # records of the leading run of acknowledged batches
    for i, offsets in enumerate(batches):
        if i not in acked:
            break
        released += len(offsets)
    assert tracker.pending == sum(map(len, batches)) - released


def test_pending_counts_records_of_batches_not_yet_committable() -> None:
    tracker = OffsetTracker()
    first = tracker.track(batch((0, 0), (0, 1), (1, 0)))
    second = tracker.track(batch((0, 2), (1, 1), (1, 2)))
    assert tracker.pending == 6
    ack(tracker, second)  # done, but behind an undone batch on both partitions
    assert tracker.pending == 6
    assert tracker.take_committable() == []
    ack(tracker, first)
    assert tracker.pending == 0
    assert tracker.take_committable() == [("t", 0, 3), ("t", 1, 3)]


def test_a_batch_spanning_partitions_moves_each_watermark_independently() -> None:
    tracker = OffsetTracker()
    a = tracker.track(batch((0, 0), (1, 0)))
    b = tracker.track(batch((1, 1)))
    ack(tracker, b)
    assert tracker.take_committable() == []  # partition 1 waits for batch a
    ack(tracker, a)
    assert tracker.take_committable() == [("t", 0, 1), ("t", 1, 2)]


def test_an_unacknowledged_span_holds_back_only_its_own_partition() -> None:
    tracker = OffsetTracker()
    a = tracker.track(batch((0, 0), (0, 1), (1, 0), (1, 1)))
    b = tracker.track(batch((0, 2), (1, 2)))
    ack(tracker, a, 0)  # partition 1's outputs of batch a are not acknowledged
    ack(tracker, b)
    assert tracker.take_committable() == [("t", 0, 3)]
    assert tracker.pending == 3  # partition 1: two records of a, one of b
    ack(tracker, a, 1)
    assert tracker.take_committable() == [("t", 1, 3)]
    assert tracker.pending == 0


def test_forget_drops_partitions_and_ignores_late_acks() -> None:
    tracker = OffsetTracker()
    a = tracker.track(batch((0, 0), (0, 1), (1, 0)))
    assert tracker.pending == 3
    tracker.forget([("t", 0)])
    assert tracker.pending == 1
    ack(tracker, a)  # late ack: partition 0 is no longer ours
    assert tracker.committable([("t", 0), ("t", 1)]) == [("t", 1, 1)]
    assert tracker.pending == 0
    tracker.forget([("t", 5)])  # never tracked: nothing happens
    assert tracker.pending == 0


@pytest.mark.parametrize(
    ("coords", "expected"),
    [
        ([], []),
        ([(0, 4), (0, 5), (0, 6)], [("t", 0, 7, 3)]),
        ([(1, 9), (0, 3), (1, 10), (0, 4)], [("t", 0, 5, 2), ("t", 1, 11, 2)]),  # interleaved
    ],
)
def test_batch_positions(
    coords: list[tuple[int, int]], expected: list[tuple[str, int, int, int]]
) -> None:
    assert batch_positions(batch(*coords)) == expected
    tracker = OffsetTracker()
    assert tracker.track(batch(*coords)).next_offsets == [e[:3] for e in expected]
