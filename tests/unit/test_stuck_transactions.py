"""Exactly-once: a transactional call stuck after a lost broker connection (librdkafka#5456).

A fake producer whose ``send_offsets_to_transaction`` blocks on an event and a fake network
with a fake clock (``eos_fakes``): each time the main thread looks at the producer (``poll``)
half a second passes; the network is down, then answers again. No real time is measured.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import pytest
from confluent_kafka import KafkaError
from eos_fakes import TIMEOUT_S, Net, Run

from stream_scorer.worker import delivery
from stream_scorer.worker.delivery import (
    RECONNECTED_GRACE_S,
    RECONNECTED_WATCH_S,
    ProducerEvents,
)

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
    # the first commit does not put the outage behind: the calls after it stay watched
    assert net.producer_events.watching


def _committed_after_a_reconnection(net: Net) -> Run:
    """A run whose producer lost the brokers, which answer again; then a transaction commits."""
    run = Run(net)
    net.producer_events.on_error(KafkaError(KafkaError._ALL_BROKERS_DOWN))  # the error callback
    net.now = net.back_at + 1
    assert run.deliver() is True
    return run


@pytest.mark.parametrize("call", ["send_offsets_to_transaction", "commit_transaction"])
def test_a_call_that_hangs_after_the_first_commit_that_followed_a_reconnection_is_left_behind(
    call: str, caplog: pytest.LogCaptureFixture
) -> None:
    net = Net(down_at=0.0, back_at=10.0)
    run = _committed_after_a_reconnection(net)
    run.producer.blocking = (call,)  # the next transaction's call hangs (librdkafka#5456)
    started = net.now
    delivered: list[bool] = []
    with caplog.at_level(logging.WARNING, "stream_scorer.worker.delivery"):
        # in a thread: a call nobody leaves behind would block this test for good
        thread = threading.Thread(target=lambda: delivered.append(run.deliver()), daemon=True)
        thread.start()
        thread.join(30)
        run.release()
        thread.join(30)
    assert delivered == [False]  # rolled back
    assert len(run.producers) == 2 and run.count("recreated") == 1
    # within the grace (a step of slack), far below the timeout bound
    assert started + RECONNECTED_GRACE_S <= run.made_at[1] <= started + RECONNECTED_GRACE_S + 1
    assert f"{call} still blocked" in caplog.text


def test_a_commit_once_the_brokers_answered_long_enough_puts_the_reconnection_behind() -> None:
    net = Net(down_at=0.0, back_at=10.0)
    run = _committed_after_a_reconnection(net)
    net.now += RECONNECTED_WATCH_S
    assert run.deliver() is True
    assert not net.producer_events.watching
    run.producer.blocking = STUCK
    started = net.now
    try:
        assert run.deliver() is False
    finally:
        run.release()
    assert run.made_at[1] >= started + TIMEOUT_S + 5  # the timeout bound again


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
    rec.committed()  # a commit: the brokers answer (back since now), the loss not yet behind
    now[0] = 7.0
    assert rec.watching and rec.waited_back(0.0) == 1.0
    now[0] = 6.0 + RECONNECTED_WATCH_S
    rec.committed()  # back for the whole watch: behind us
    assert rec.lost_at is None and rec.back_since is None
    rec.answered()
    assert rec.waited_back(0.0) == 0.0
