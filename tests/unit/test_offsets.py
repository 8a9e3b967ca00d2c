import pytest

from stream_scorer.offsets import OffsetTracker


@pytest.mark.parametrize(
    ("tracked", "acked", "expected"),
    [
        ([0, 1, 2], [0, 1, 2], [("t", 0, 3)]),
        ([0, 1, 2], [1, 2], []),  # 0 not delivered: nothing may be committed
        ([0, 1, 2], [0, 2], [("t", 0, 1)]),
        ([5, 6, 9], [9, 6, 5], [("t", 0, 10)]),  # out of order, gaps in offsets (compaction)
        ([], [3], []),  # an ack for an untracked partition is ignored
    ],
)
def test_watermark(
    tracked: list[int], acked: list[int], expected: list[tuple[str, int, int]]
) -> None:
    tracker = OffsetTracker()
    for off in tracked:
        tracker.track("t", 0, off)
    for off in acked:
        tracker.ack("t", 0, off)
    assert tracker.take_committable() == expected
    assert tracker.take_committable() == []  # reported once


def test_partitions_are_independent_and_forget_drops_them() -> None:
    tracker = OffsetTracker()
    for p in (0, 1):
        for off in range(3):
            tracker.track("t", p, off)
    tracker.ack("t", 1, 0)
    tracker.ack("t", 0, 1)
    assert tracker.take_committable() == [("t", 1, 1)]
    assert tracker.pending == 5
    tracker.forget([("t", 0)])
    tracker.ack("t", 0, 0)  # late ack after revoke
    assert tracker.committable([("t", 0), ("t", 1)]) == [("t", 1, 1)]
    assert tracker.pending == 2
