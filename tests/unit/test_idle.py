"""When a worker counts as idle (``worker.idle_timeout_s``) and what a stop must leave behind."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import Msg, OnePipeline

from stream_scorer.config import load_config
from stream_scorer.errors import BrokerError
from stream_scorer.stages.pipeline import BatchResult
from stream_scorer.stages.records import Scored
from stream_scorer.worker.flow import IdleClock, StopFlag
from stream_scorer.worker.loop import WorkerReport, _loop, check_clean_stop
from stream_scorer.worker.metrics import Metrics
from stream_scorer.worker.offsets import OffsetTracker

SCHEMA = Path(__file__).parents[2] / "schemas" / "prediction.v1.avsc"


# --- IdleClock ----------------------------------------------------------------------------
# One observation every 0.5 s from t = 0; ``changes`` maps a time to what changes from then on
# (``records`` and ``rebalance`` only for that one observation); ``blocked`` is an interval in
# which the loop made no observation (stuck in a call). Limit 3 s, gaps over 1 s do not count.
Change = dict[str, Any]


def _first_stop(
    changes: dict[float, Change],
    *,
    limit: float = 3.0,
    until: float = 30.0,
    blocked: tuple[float, float] | None = None,
) -> float | None:
    clock = IdleClock(limit, max_gap_s=1.0)
    state: Change = {"joined": True, "settled": True, "at_end": True, "in_flight": 0}
    state["rolled_back"] = 0
    rebalances = 0  # ``joined`` stands for the first assignment
    for step in range(int(until / 0.5) + 1):
        now = step * 0.5
        if blocked and blocked[0] < now < blocked[1]:
            continue
        change = dict(changes.get(now, {}))
        records = change.pop("records", 0)
        rebalances += change.pop("rebalance", 0)
        state.update(change)
        if clock.observe(now, records=records, rebalances=rebalances, **state):
            return now
    return None


@pytest.mark.parametrize(
    ("changes", "kwargs", "expected"),
    [
        pytest.param({}, {}, 3.0, id="assigned-partitions-read-to-the-end"),
        pytest.param({}, {"limit": 0.0}, None, id="no-limit-never-idle"),
        pytest.param({2.0: {"records": 5}}, {}, 5.5, id="a-record-restarts-the-count"),
        pytest.param({2.0: {"rebalance": 1}}, {}, 5.5, id="a-rebalance-event-restarts-it"),
        pytest.param(
            {t / 2: {"rebalance": 1} for t in range(0, 121, 4)},
            {},
            None,
            id="a-group-rebalancing-every-2-s-never-settles",
        ),
        pytest.param(
            {0.0: {"joined": False}, 4.0: {"joined": True}},
            {},
            7.0,
            id="not-idle-before-joining",
        ),
        pytest.param(
            {0.0: {"settled": False}, 10.0: {"settled": True}},
            {},
            13.0,
            id="not-idle-while-a-rebalance-is-in-progress",
        ),
        pytest.param(
            {0.0: {"at_end": False}, 20.0: {"at_end": True}},
            {},
            23.0,
            id="not-idle-while-a-partition-has-records-left",
        ),
        pytest.param(
            {0.0: {"in_flight": 7}, 1.5: {"in_flight": 0}},
            {},
            4.5,
            id="not-idle-while-outputs-await-acknowledgement",
        ),
        pytest.param(
            {1.0: {"rolled_back": 40}},
            {},
            None,
            id="never-idle-after-a-rolled-back-batch",
        ),
        pytest.param(
            {1.0: {"rolled_back": 40}, 6.0: {"rolled_back": 0}},
            {},
            9.0,
            id="idle-again-once-a-batch-is-delivered",
        ),
        pytest.param(
            {},
            {"blocked": (1.0, 20.0)},
            22.0,
            id="time-blocked-in-a-call-does-not-count",
        ),
        pytest.param(
            {0.0: {"at_end": False}, 1.0: {"at_end": True}},
            {"blocked": (1.0, 40.0)},
            43.0,
            id="blocked-right-after-the-last-work",
        ),
    ],
)
def test_idle_clock(changes: dict[float, Change], kwargs: dict[str, Any], expected: float) -> None:
    kwargs.setdefault("until", 60.0)
    assert _first_stop(changes, **kwargs) == expected


# --- the stop invariant --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("counts", "message"),
    [
        ({}, None),
        ({"unacknowledged": 3}, "3 outputs not acknowledged"),
        ({"rolled_back": 40}, r"stopped \(idle_timeout\) with the last transaction rolled back"),
        ({"in_flight": 2}, "2 consumed records not delivered"),
    ],
)
def test_a_stop_with_anything_undelivered_is_a_failure(
    counts: dict[str, int], message: str | None
) -> None:
    args = {"unacknowledged": 0, "rolled_back": 0, "in_flight": 0, **counts}
    if message is None:
        check_clean_stop("idle_timeout", shutdown_timeout_s=30, **args)
    else:
        with pytest.raises(BrokerError, match=message):
            check_clean_stop("idle_timeout", shutdown_timeout_s=30, **args)


class _Source:
    """The main loop's view of the consumer: one batch, then an idle, settled group.

    After ``polls`` polls it sets the stop flag (``"enough"``), as a signal would.
    """

    def __init__(self, batch: list[Msg], stop: StopFlag, polls: int) -> None:
        self._batches: Iterator[list[Msg]] = iter([batch])
        self._stop = stop
        self._polls = polls
        self.rebalances = 1
        self.joined = True
        self.group_settled = True

    def poll_batch(self, _max_records: int, max_wait_s: float) -> list[Msg]:
        self._polls -= 1
        if self._polls <= 0:
            self._stop.set("enough")
        batch = next(self._batches, [])
        if not batch:
            threading.Event().wait(max_wait_s)  # like consume(): nothing came within the wait
        return batch

    def fetched_to_end(self) -> bool:
        return True

    def split(self, batch: list[Msg]) -> tuple[list[Msg], list[Any]]:
        return batch, []

    def raise_errors(self) -> None:
        pass


class _Pipeline:
    def process(self, _batch: list[Msg]) -> BatchResult:
        return BatchResult(Scored([], [], []), [])


class _RolledBack:
    """Exactly-once delivery whose transaction is rolled back; a signal arrives meanwhile."""

    paused = False

    def __init__(self, stop: StopFlag | None = None) -> None:
        self._stop = stop
        self.calls = 0

    def deliver(self, _ticket: Any, _result: Any) -> bool:
        self.calls += 1
        if self._stop is not None:
            self._stop.set("SIGTERM")
        return False

    def service(self) -> None:
        pass


class _Delivered:
    """Exactly-once delivery whose transactions commit."""

    paused = False

    def __init__(self, tracker: OffsetTracker) -> None:
        self._tracker = tracker

    def deliver(self, ticket: Any, _result: Any) -> bool:
        for span in ticket.spans.values():
            self._tracker.ack(span)
        return True

    def service(self) -> None:
        pass


def _run_loop(
    delivery: _RolledBack | None, stop: StopFlag, *, idle_s: float, polls: int
) -> tuple[int, WorkerReport]:
    """Run the main loop over one batch of 4 records with 1 ms poll waits."""
    cfg = load_config(
        None,
        environ={},
        overrides={
            "kafka": {"bootstrap_servers": "unused:9092"},
            "input": {"topic": "in", "group_id": "g", "schema": str(SCHEMA), "id_field": "id"},
            "output": {"topic": "out", "schema": str(SCHEMA)},
            "dead_letter": {"topic": "dlq"},
            "model": {"path": str(SCHEMA.parent)},  # never loaded here
            "worker": {"idle_timeout_s": idle_s},
            "batch": {"max_wait_ms": 1},
        },
    )
    report = WorkerReport("w")
    tracker = OffsetTracker()
    rolled_back = _loop(
        cfg,
        _Source([Msg(b"x", o=i) for i in range(4)], stop, polls),  # type: ignore[arg-type]
        OnePipeline(_Pipeline()),  # type: ignore[arg-type]  # the worker's Models
        delivery or _Delivered(tracker),  # type: ignore[arg-type]
        tracker,
        Metrics(),
        report,
        stop,
    )
    return rolled_back, report


def test_idle_stops_a_worker_whose_records_are_all_delivered() -> None:
    stop = StopFlag()
    rolled_back, report = _run_loop(None, stop, idle_s=0.05, polls=100_000)
    assert (rolled_back, report.stopped_by, report.consumed) == (0, "idle_timeout", 4)


def test_idle_never_stops_a_worker_whose_last_transaction_was_rolled_back() -> None:
    # 300 polls of at least 1 ms each: six times the idle timeout, never idle
    stop = StopFlag()
    rolled_back, report = _run_loop(_RolledBack(), stop, idle_s=0.05, polls=300)
    assert (rolled_back, report.stopped_by, report.consumed) == (4, "enough", 0)
    with pytest.raises(BrokerError, match=r"stopped \(enough\) with the last transaction"):
        check_clean_stop(
            report.stopped_by,
            unacknowledged=0,
            rolled_back=rolled_back,
            in_flight=0,
            shutdown_timeout_s=30,
        )


def test_a_signal_right_after_a_rolled_back_transaction_is_a_clean_stop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # the rolled-back records were rewound: nothing of them is committed, the partition's next
    # reader consumes them again (a rolling restart meets this whenever a rebalance aborts one)
    stop = StopFlag()
    rolled_back, report = _run_loop(_RolledBack(stop), stop, idle_s=0.05, polls=100_000)
    assert (rolled_back, report.stopped_by, report.consumed) == (4, "SIGTERM", 0)
    check_clean_stop(
        report.stopped_by,
        unacknowledged=0,
        rolled_back=rolled_back,
        in_flight=0,
        shutdown_timeout_s=30,
    )
    assert "right after a rolled-back transaction: its 4 records stay uncommitted" in caplog.text
    # the same rollback on a stop the worker decided itself is a failure
    with pytest.raises(BrokerError, match="last transaction rolled back: its 4 records"):
        check_clean_stop(
            "max_messages", unacknowledged=0, rolled_back=4, in_flight=0, shutdown_timeout_s=30
        )
