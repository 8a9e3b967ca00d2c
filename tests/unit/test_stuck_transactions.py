"""Exactly-once: a transactional call stuck after a lost broker connection (librdkafka#5456).

A fake producer whose ``send_offsets_to_transaction`` blocks on an event and a fake network
with a fake clock: each time the main thread looks at the producer (``poll``) half a second
passes; the network is down, then answers again. No real time is measured.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException
from support import Msg

from stream_scorer.stages.pipeline import BatchResult
from stream_scorer.stages.records import Scored
from stream_scorer.worker import delivery
from stream_scorer.worker.delivery import RECONNECTED_GRACE_S, ExactlyOnce, Reconnection
from stream_scorer.worker.metrics import Metrics
from stream_scorer.worker.offsets import OffsetTracker
from stream_scorer.worker.sink import SinkContext

TIMEOUT_S = 20.0  # transaction timeout: the old bound is this + 5 s
STEP_S = 0.5  # fake time per look at the producer


class Net:
    """A fake clock and a broker that is down from ``down_at`` until ``back_at``."""

    def __init__(self, down_at: float, back_at: float) -> None:
        self.now = 0.0
        self.down_at, self.back_at = down_at, back_at
        self.reconnection = Reconnection(self.clock)

    def clock(self) -> float:
        return self.now

    @property
    def down(self) -> bool:
        return self.down_at <= self.now < self.back_at


class FakeProducer:
    """The transactional producer API; ``send_offsets_to_transaction`` blocks until released."""

    def __init__(self, net: Net, release_at: float | None) -> None:
        self.net = net
        self.release_at = release_at  # fake time at which a blocked call returns; None: never
        self.released = threading.Event()
        self.reported_down = False

    def init_transactions(self, timeout: float = -1) -> None:
        pass

    def begin_transaction(self) -> None:
        pass

    def send_offsets_to_transaction(
        self, positions: Any, metadata: Any, timeout: float = -1
    ) -> None:
        self.released.wait()

    def commit_transaction(self, timeout: float = -1) -> None:
        pass

    def abort_transaction(self, timeout: float = -1) -> None:
        pass

    def purge(self, in_queue: bool = True, in_flight: bool = True, blocking: bool = True) -> None:
        pass

    def produce(self, topic: str, value: Any = None, key: Any = None, **kwargs: Any) -> None:
        pass

    def flush(self, timeout: float = -1) -> int:
        return 0

    def poll(self, timeout: float = 0) -> int:
        """Time passes; the error callback hears of the outage once, as librdkafka's would."""
        self.net.now += STEP_S
        if self.net.down and not self.reported_down:
            self.reported_down = True
            self.net.reconnection.on_error(KafkaError(KafkaError._ALL_BROKERS_DOWN))
        if self.release_at is not None and self.net.now >= self.release_at:
            self.released.set()
        return 0

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any:
        if self.net.down:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT))
        return object()


class FakeSource:
    @property
    def assignment(self) -> set[tuple[str, int]]:
        return set()

    def group_metadata(self) -> Any:
        return None

    def mark_committed(self, offsets: list[tuple[str, int, int]]) -> None:
        pass

    def rewind(self, timeout_s: float = 30.0) -> None:
        pass


class Run:
    """An ``ExactlyOnce`` over fake producers; records when each producer was made."""

    def __init__(self, net: Net, release_at: float | None = None) -> None:
        self.net = net
        self.producers: list[FakeProducer] = []
        self.made_at: list[float] = []
        self.release_at = release_at
        self.metrics = Metrics()
        self.tracker = OffsetTracker()
        self.eos = ExactlyOnce(
            self._make,
            SinkContext("out", "dlq", "g", "w", "v1"),
            FakeSource(),  # type: ignore[arg-type]
            self.tracker,
            self.metrics,
            timeout_s=TIMEOUT_S,
            bootstrap="127.0.0.1:9",
            unreachable_timeout_s=120,
            reconnection=net.reconnection,
            clock=net.clock,
        )

    def _make(self) -> FakeProducer:
        producer = FakeProducer(self.net, self.release_at)
        self.producers.append(producer)
        self.made_at.append(self.net.now)
        return producer

    def deliver(self) -> bool:
        ticket = self.tracker.track([Msg(b"x", o=7)])
        return self.eos.deliver(ticket, BatchResult(Scored([], [], []), []))

    def count(self, outcome: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "stream_scorer_transactions_total", {"outcome": outcome}
        )
        return value or 0.0

    def release(self) -> None:
        for producer in self.producers:
            producer.released.set()


@pytest.fixture(autouse=True)
def fast_slices(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The main thread looks at the producer every 10 ms of real time (fake time: STEP_S)."""
    monkeypatch.setattr(delivery, "_WATCH_EVERY_S", 0.01)
    yield


def test_a_stuck_call_is_left_behind_soon_after_the_broker_answers_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    net = Net(down_at=0.0, back_at=10.0)
    run = Run(net)
    try:
        with caplog.at_level(logging.WARNING, "stream_scorer.worker.delivery"):
            assert run.deliver() is False  # rolled back
    finally:
        run.release()
    assert len(run.producers) == 2 and run.count("recreated") == 1
    abandoned_at = run.made_at[1]
    # the grace after the broker came back (one step of slack), far below the old bound
    assert (
        net.back_at + RECONNECTED_GRACE_S <= abandoned_at <= net.back_at + RECONNECTED_GRACE_S + 1
    )
    assert abandoned_at < TIMEOUT_S
    assert "still blocked" in caplog.text and "after the brokers answered again" in caplog.text


def test_a_call_that_returns_after_the_reconnection_is_not_left_behind() -> None:
    net = Net(down_at=0.0, back_at=10.0)
    run = Run(net, release_at=net.back_at + RECONNECTED_GRACE_S - 1)
    try:
        assert run.deliver() is True
    finally:
        run.release()
    assert len(run.producers) == 1 and run.count("recreated") == 0
    assert net.reconnection.lost_at is None  # the commit put the outage behind


def test_while_the_broker_stays_down_the_old_bound_applies(
    caplog: pytest.LogCaptureFixture,
) -> None:
    net = Net(down_at=0.0, back_at=float("inf"))
    run = Run(net)
    try:
        with caplog.at_level(logging.WARNING, "stream_scorer.worker.delivery"):
            assert run.deliver() is False
    finally:
        run.release()
    assert len(run.producers) == 2
    assert run.made_at[1] >= TIMEOUT_S + 5  # the transaction timeout and its grace
    assert f"did not return within {TIMEOUT_S + 5:.0f} s" in caplog.text


def test_without_a_lost_connection_a_slow_call_gets_the_old_bound() -> None:
    net = Net(down_at=float("inf"), back_at=float("inf"))  # never down
    run = Run(net)
    try:
        assert run.deliver() is False
    finally:
        run.release()
    assert run.made_at[1] >= TIMEOUT_S + 5


def test_reconnection_counts_only_the_wait_with_the_brokers_back() -> None:
    now = [0.0]
    rec = Reconnection(lambda: now[0])
    assert rec.waited_back(0.0) == 0.0  # nothing lost
    rec.answered()
    assert rec.back_since is None  # answers mean nothing without a loss
    rec.lost()
    now[0] = 4.0
    rec.unanswered()
    assert rec.waited_back(0.0) == 0.0  # still down
    rec.answered()
    now[0] = 6.0
    assert rec.waited_back(0.0) == 2.0  # back since 4
    assert rec.waited_back(5.0) == 1.0  # a call started after the brokers came back
    rec.lost()  # lost again: not back until a broker answers
    assert rec.waited_back(0.0) == 0.0
    rec.clear()
    rec.answered()
    assert rec.waited_back(0.0) == 0.0
