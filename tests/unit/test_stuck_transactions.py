"""Exactly-once: a transactional call stuck after a lost broker connection (librdkafka#5456).

A fake producer whose ``send_offsets_to_transaction`` blocks on an event and a fake network
with a fake clock (``eos_fakes``): each time the main thread looks at the producer (``poll``)
half a second passes; the network is down, then answers again. No real time is measured.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from eos_fakes import TIMEOUT_S, Net, Run

from stream_scorer.worker import delivery
from stream_scorer.worker.delivery import RECONNECTED_GRACE_S, ProducerEvents

#: The call that blocks (librdkafka#5456).
STUCK = ("send_offsets_to_transaction",)


@pytest.fixture(autouse=True)
def fast_slices(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The main thread looks at the producer every 10 ms of real time (fake time: STEP_S)."""
    monkeypatch.setattr(delivery, "_WATCH_EVERY_S", 0.01)
    yield


def test_a_stuck_call_is_left_behind_soon_after_the_broker_answers_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    net = Net(down_at=0.0, back_at=10.0)
    run = Run(net, blocking=STUCK)
    try:
        with caplog.at_level(logging.WARNING, "stream_scorer.worker.delivery"):
            assert run.deliver() is False  # rolled back
    finally:
        run.release()
    assert len(run.producers) == 2 and run.count("recreated") == 1
    abandoned_at = run.made_at[1]
    # the grace after the broker came back (one step of slack), far below the timeout bound
    assert (
        net.back_at + RECONNECTED_GRACE_S <= abandoned_at <= net.back_at + RECONNECTED_GRACE_S + 1
    )
    assert abandoned_at < TIMEOUT_S
    assert "still blocked" in caplog.text and "after the brokers answered again" in caplog.text


def test_a_call_that_returns_after_the_reconnection_is_not_left_behind() -> None:
    net = Net(down_at=0.0, back_at=10.0)
    run = Run(net, blocking=STUCK, release_at=net.back_at + RECONNECTED_GRACE_S - 1)
    try:
        assert run.deliver() is True
    finally:
        run.release()
    assert len(run.producers) == 1 and run.count("recreated") == 0
    assert net.producer_events.lost_at is None  # the commit put the outage behind


def test_while_the_broker_stays_down_the_timeout_bound_applies(
    caplog: pytest.LogCaptureFixture,
) -> None:
    net = Net(down_at=0.0, back_at=float("inf"))
    run = Run(net, blocking=STUCK)
    try:
        with caplog.at_level(logging.WARNING, "stream_scorer.worker.delivery"):
            assert run.deliver() is False
    finally:
        run.release()
    assert len(run.producers) == 2
    assert run.made_at[1] >= TIMEOUT_S + 5  # the transaction timeout and its grace
    assert f"did not return within {TIMEOUT_S + 5:.0f} s" in caplog.text


def test_without_a_lost_connection_a_slow_call_gets_the_timeout_bound() -> None:
    net = Net(down_at=float("inf"), back_at=float("inf"))  # never down
    run = Run(net, blocking=STUCK)
    try:
        assert run.deliver() is False
    finally:
        run.release()
    assert run.made_at[1] >= TIMEOUT_S + 5


def test_reconnection_counts_only_the_wait_with_the_brokers_back() -> None:
    now = [0.0]
    rec = ProducerEvents(lambda: now[0])
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
