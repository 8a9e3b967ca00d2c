"""The fault harness's at-least-once check on synthetic data: a duplicate no fault explains fails.

A fault's window holds, per input partition, the offsets from the committed one read just before
the fault up to (not including) the high watermark right after it; up to the high watermark once
the group settled only when a worker logged a refused commit or lost partitions in between.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from confluent_kafka import ConsumerGroupState, KafkaError, KafkaException, Node, TopicPartition
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # re-exported, no __all__
    ConsumerGroupDescription,
    MemberAssignment,
    MemberDescription,
)
from faults import REFUSAL_LOG_LINES, FaultWindow, check_duplicates, settled, unexplained

from stream_scorer.logs import JsonFormatter
from stream_scorer.worker.metrics import Metrics
from stream_scorer.worker.source import Source


def kill(refusals: int = 0) -> FaultWindow:
    return FaultWindow(
        "kill -9 w1",
        committed={0: 100, 1: 40},
        at_fault={0: 180, 1: 90},
        settled={0: 400, 1: 250},
        refusals=refusals,
    )


LATER = FaultWindow(
    "kill -9 w2", committed={0: 500, 1: 300}, at_fault={0: 560, 1: 330}, settled={0: 900, 1: 700}
)


def test_a_duplicate_inside_a_window_passes() -> None:
    dups = [(0, 100), (0, 179), (1, 40), (1, 89), (0, 500), (1, 329)]
    assert unexplained(dups, [kill(), LATER]) == []
    check_duplicates(dups, [kill(), LATER])


@pytest.mark.parametrize(
    "dup",
    [
        (0, 99),  # committed before the first fault: no fault repeats it
        (0, 180),  # the first window ends at the high watermark after the fault (exclusive)
        (0, 300),  # after the first fault, before the second: only a rebalance could explain it
        (0, 560),  # past the last window
        (1, 95),  # inside partition 0's first window, but not partition 1's
        (2, 120),  # a partition no window covers
    ],
)
def test_a_duplicate_outside_every_window_fails(dup: tuple[int, int]) -> None:
    assert unexplained([(0, 150), dup], [kill(), LATER]) == [dup]
    with pytest.raises(AssertionError, match="1 of 2 duplicates lie in no fault's window"):
        check_duplicates([(0, 150), dup], [kill(), LATER])


def test_a_logged_refusal_extends_the_window_to_the_settled_group() -> None:
    assert kill().end == {0: 180, 1: 90}
    assert kill(refusals=1).end == {0: 400, 1: 250}
    check_duplicates([(0, 300), (1, 249)], [kill(refusals=1)])
    with pytest.raises(AssertionError, match="lie in no fault's window"):
        check_duplicates([(0, 400)], [kill(refusals=1)])  # not past the settled group either


def test_without_faults_any_duplicate_fails() -> None:
    with pytest.raises(AssertionError, match="lie in no fault's window"):
        check_duplicates([(0, 0)], [])
    check_duplicates([], [])


def test_a_window_that_never_closed_fails_and_explains_nothing() -> None:
    open_window = FaultWindow("SIGSTOP w0", committed={0: 0, 1: 0}, at_fault={0: 50, 1: 50})
    assert open_window.end is None and not open_window.holds(0, 1)
    with pytest.raises(AssertionError, match="never settled after"):
        check_duplicates([], [kill(), open_window])


def test_no_commit_yet_and_an_unknown_high_watermark() -> None:
    # an exit noticed while the broker did not answer: the settled group's high watermarks
    first = FaultWindow("w0 exited 1", committed={0: -1001}, settled={0: 10})
    assert first.holds(0, 0) and first.holds(0, 9) and not first.holds(0, 10)
    assert first.records == 10
    assert kill().records == 80 + 50


def _member(member_id: str, *partitions: int, topic: str = "in") -> MemberDescription:
    tps = [TopicPartition(topic, p) for p in partitions]
    return MemberDescription(member_id, f"client-{member_id}", "host", MemberAssignment(tps))


def _group(state: ConsumerGroupState, *members: MemberDescription) -> ConsumerGroupDescription:
    coordinator = Node(1, "localhost", 9092)
    return ConsumerGroupDescription(
        "g", False, list(members), "cooperative-sticky", state, coordinator
    )


def test_a_group_has_settled_when_stable_complete_and_without_the_gone_member() -> None:
    stable = ConsumerGroupState.STABLE
    full = _group(stable, _member("a", 0, 1), _member("b", 2), _member("c", 3))
    assert settled(full, "in", 4, live=3)
    assert not settled(full, "in", 4, live=3, gone=frozenset({"b"}))  # the dead one still in
    assert not settled(full, "in", 4, live=4)  # a live worker has not joined
    rebalancing = _group(
        ConsumerGroupState.PREPARING_REBALANCING, _member("a", 0, 1), _member("b", 2, 3)
    )
    assert not settled(rebalancing, "in", 4, live=2)
    revoked = _group(stable, _member("a", 0), _member("b", 2, 3))  # partition 1 between owners
    assert not settled(revoked, "in", 4, live=2)
    other_topic = _group(stable, _member("a", 0, 1), _member("b", 2, 3, topic="other"))
    assert not settled(other_topic, "in", 4, live=2)


class RefusingConsumer:
    def commit(self, **_kwargs: Any) -> None:
        raise KafkaException(KafkaError(KafkaError.REBALANCE_IN_PROGRESS))


def test_the_refusals_counted_are_the_lines_a_worker_writes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    source = Source(
        {},
        "in",
        Metrics(),
        unreachable_timeout_s=1,
        on_revoke=lambda _p: None,
        on_lost=lambda _p: None,
    )  # never entered: no consumer is created
    source._consumer = RefusingConsumer()
    source._assigned = {("in", 0), ("in", 1)}
    with caplog.at_level(logging.INFO, "stream_scorer.worker.source"):
        source.commit([("in", 0, 5)])  # a revoke commit the broker refuses
        source._lost_cb(None, [TopicPartition("in", 0), TopicPartition("in", 1)])
    lines = "\n".join(JsonFormatter().format(r) for r in caplog.records)  # as in a worker's log
    assert [lines.count(line) for line in REFUSAL_LOG_LINES] == [1, 1]
