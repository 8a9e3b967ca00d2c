"""Exactly-once recovery: what ``ExactlyOnce`` does with each kind of transaction error.

Real ``KafkaError`` objects, classified as librdkafka classifies them (abortable, retriable,
fatal), wrapped in ``KafkaException``; a fake transactional producer and source
(``eos_fakes``); the real offset tracker, metrics and sink context. The back-off between
rolled-back transactions is recorded instead of slept.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence
from types import SimpleNamespace

import pytest
from confluent_kafka import KafkaError, KafkaException
from eos_fakes import GROUP_METADATA, Run, kafka_exception
from support import Msg

from stream_scorer.errors import AccessDeniedError, BrokerError, FencedError
from stream_scorer.worker import delivery
from stream_scorer.worker.delivery import MAX_ABANDONED_PRODUCERS, MAX_FAILED_TRANSACTIONS

ASSIGNED = [("in", 0), ("in", 1)]
BATCH = [Msg(b"a", p=0, o=10), Msg(b"b", p=0, o=11), Msg(b"c", p=1, o=3)]
#: What committing ``BATCH`` stores: the offset after its last record, per partition.
NEXT_OFFSETS = [("in", 0, 12), ("in", 1, 4)]
TRANSACTION = ["begin_transaction", "send_offsets_to_transaction", "commit_transaction"]

ABORTABLE = {
    "commit_transaction": kafka_exception(KafkaError._MSG_TIMED_OUT, txn_requires_abort=True),
    "send_offsets_to_transaction": kafka_exception(
        KafkaError.ILLEGAL_GENERATION, txn_requires_abort=True
    ),
}


def abortable() -> KafkaException:
    return kafka_exception(KafkaError._MSG_TIMED_OUT, txn_requires_abort=True)


def retriable() -> KafkaException:
    return kafka_exception(KafkaError._TIMED_OUT, retriable=True)


@pytest.fixture(autouse=True)
def backoffs(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The back-off sleeps after a rolled-back transaction, recorded instead of slept."""
    slept: list[float] = []
    monkeypatch.setattr(
        delivery, "time", SimpleNamespace(sleep=slept.append, monotonic=time.monotonic)
    )
    return slept


def make_run(**script: Sequence[BaseException]) -> Run:
    return Run(script={call: list(errors) for call, errors in script.items()}, assignment=ASSIGNED)


def test_a_transaction_commits_the_outputs_with_the_offsets() -> None:
    run = make_run()
    assert run.deliver(BATCH) is True
    assert run.producer.calls == ["init_transactions", *TRANSACTION]
    assert run.producer.produced == [("out", b"p10"), ("out", b"p11"), ("out", b"p3")]
    assert run.producer.sent_offsets == [(NEXT_OFFSETS, GROUP_METADATA)]
    assert run.source.committed == [NEXT_OFFSETS] and run.source.rewinds == 0
    assert run.count("committed") == 1 and run.tracker.pending == 0


@pytest.mark.parametrize("call", sorted(ABORTABLE))
def test_an_abortable_error_aborts_rewinds_and_rolls_back(call: str, backoffs: list[float]) -> None:
    run = make_run(**{call: [ABORTABLE[call]]})
    assert run.deliver(BATCH) is False
    producer = run.producer
    assert len(run.producers) == 1  # the same producer goes on
    assert producer.calls[-1] == "abort_transaction" and "purge" not in producer.calls
    assert producer.calls.count("send_offsets_to_transaction") == 1  # not retried: not retriable
    assert run.source.rewinds == 1 and run.source.committed == []
    assert run.tracker.pending == 0  # the rolled-back batch is forgotten, to be read again
    assert (run.count("aborted"), run.count("recreated"), run.count("committed")) == (1, 0, 0)
    run.eos.sink.raise_errors()  # the aborted outputs' purge reports were cleared
    assert backoffs == [0.2]
    assert run.deliver(BATCH) is True  # the batch read again commits on the same producer
    assert len(run.producers) == 1 and run.count("committed") == 1


def test_an_abort_that_fails_recreates_the_producer() -> None:
    run = make_run(commit_transaction=[abortable()], abort_transaction=[retriable()])
    assert run.deliver(BATCH) is False
    old, new = run.producers
    assert old.calls[-2:] == ["abort_transaction", "purge"]
    assert new.calls == ["init_transactions"]  # finishes or aborts the old one's transaction
    assert run.source.rewinds == 1 and run.count("aborted") == 1
    assert run.deliver(BATCH) is True
    assert new.calls == ["init_transactions", *TRANSACTION] and len(run.producers) == 2


@pytest.mark.parametrize(
    "error",
    [
        kafka_exception(KafkaError._TIMED_OUT, retriable=True),
        kafka_exception(KafkaError.COORDINATOR_NOT_AVAILABLE, retriable=True),
        kafka_exception(KafkaError.CONCURRENT_TRANSACTIONS, retriable=True),
    ],
)
def test_an_ambiguous_error_recreates_the_producer(error: KafkaException) -> None:
    run = make_run(commit_transaction=[error])
    assert run.deliver(BATCH) is False
    old, new = run.producers
    assert old.calls[-2:] == ["commit_transaction", "purge"]  # not aborted: outcome unknown
    assert new.calls == ["init_transactions"]
    assert run.source.rewinds == 1 and run.source.committed == []
    assert (run.count("recreated"), run.count("aborted")) == (1, 0)
    assert run.deliver(BATCH) is True and run.producer is new


@pytest.mark.parametrize(
    ("call", "error"),
    [
        ("commit_transaction", kafka_exception(KafkaError.PRODUCER_FENCED, fatal=True)),
        ("commit_transaction", kafka_exception(KafkaError._FENCED, fatal=True)),
        ("send_offsets_to_transaction", kafka_exception(KafkaError.INVALID_PRODUCER_EPOCH)),
        # fatal wins over abortable or retriable: no new transaction can start
        ("commit_transaction", kafka_exception(KafkaError.INVALID_TXN_STATE, fatal=True)),
        ("commit_transaction", kafka_exception(KafkaError._FATAL, fatal=True, retriable=True)),
        (
            "send_offsets_to_transaction",
            kafka_exception(KafkaError.PRODUCER_FENCED, txn_requires_abort=True),
        ),
    ],
)
def test_a_fenced_or_fatal_error_stops_the_worker(call: str, error: KafkaException) -> None:
    run = make_run(**{call: [error]})
    with pytest.raises(FencedError, match="fenced") as raised:
        run.deliver(BATCH)
    assert raised.value.__cause__ is error
    assert len(run.producers) == 1 and "abort_transaction" not in run.producer.calls
    assert run.source.rewinds == 0 and run.source.committed == []
    assert run.count("aborted") == run.count("recreated") == run.count("committed") == 0


def test_a_producer_fenced_while_it_is_recreated_stops_the_worker() -> None:
    run = make_run(commit_transaction=[retriable()])
    fenced = kafka_exception(KafkaError.PRODUCER_FENCED, fatal=True)
    run.script["init_transactions"] = [fenced]  # the replacement's
    with pytest.raises(FencedError) as raised:
        run.deliver(BATCH)
    assert raised.value.__cause__ is fenced and len(run.producers) == 2


@pytest.mark.parametrize(
    "error",
    [
        kafka_exception(KafkaError._STATE),
        RuntimeError("not a Kafka error"),
    ],
)
def test_an_unclassified_error_is_a_broker_error(error: Exception) -> None:
    run = make_run(commit_transaction=[error])
    with pytest.raises(BrokerError, match="transaction failed") as raised:
        run.deliver(BATCH)
    assert type(raised.value) is BrokerError  # not fenced: the worker exits, to be restarted
    assert raised.value.__cause__ is error
    assert len(run.producers) == 1 and run.source.rewinds == 0
    assert run.count("aborted") == run.count("recreated") == 0


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (
            "begin_transaction",
            kafka_exception(KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED),
            "not authorized to use transactional id",
        ),
        (
            "commit_transaction",
            kafka_exception(KafkaError.TOPIC_AUTHORIZATION_FAILED),  # not abortable, retriable
            "not authorized to write topic 'out' or 'dlq' (TOPIC_AUTHORIZATION_FAILED)",
        ),
        (
            "send_offsets_to_transaction",
            kafka_exception(KafkaError.GROUP_AUTHORIZATION_FAILED, txn_requires_abort=True),
            "not authorized to join group",
        ),
    ],
)
def test_a_refused_acl_rolls_back_and_stops_the_worker_at_once(
    call: str, error: KafkaException, words: str
) -> None:
    run = make_run(**{call: [error]})
    with pytest.raises(AccessDeniedError) as raised:
        run.deliver(BATCH)
    assert words in str(raised.value)
    assert raised.value.__cause__ is error
    assert len(run.producers) == 1 and run.source.rewinds == 0  # no retry
    assert run.source.committed == [] and run.count("committed") == 0


def test_rolled_back_transactions_in_a_row_stop_the_worker(backoffs: list[float]) -> None:
    run = make_run(commit_transaction=[abortable() for _ in range(MAX_FAILED_TRANSACTIONS)])
    for _ in range(MAX_FAILED_TRANSACTIONS - 1):
        assert run.deliver(BATCH) is False
    with pytest.raises(BrokerError, match=f"{MAX_FAILED_TRANSACTIONS} transactions in a row"):
        run.deliver(BATCH)
    assert backoffs == [0.2, 0.4, 0.8, 1.6]  # doubling, one fewer than the failures
    assert run.count("aborted") == MAX_FAILED_TRANSACTIONS


def test_a_committed_transaction_resets_the_count_of_rollbacks() -> None:
    run = make_run()
    for _ in range(3):
        run.script["commit_transaction"] = [abortable() for _ in range(MAX_FAILED_TRANSACTIONS - 1)]
        for _ in range(MAX_FAILED_TRANSACTIONS - 1):
            assert run.deliver(BATCH) is False
        assert run.deliver(BATCH) is True
    assert run.count("aborted") == 3 * (MAX_FAILED_TRANSACTIONS - 1)


def test_send_offsets_is_retried_with_the_same_offsets() -> None:
    run = make_run(send_offsets_to_transaction=[retriable(), retriable()])
    assert run.deliver(BATCH) is True
    assert run.producer.sent_offsets == [(NEXT_OFFSETS, GROUP_METADATA)] * 3
    assert run.producer.calls == [
        "init_transactions",
        "begin_transaction",
        *["send_offsets_to_transaction"] * 3,
        "commit_transaction",
    ]
    assert run.source.committed == [NEXT_OFFSETS] and run.source.rewinds == 0
    assert run.count("committed") == 1 and len(run.producers) == 1


def test_send_offsets_failing_every_try_recreates_the_producer() -> None:
    tries = delivery._SEND_OFFSETS_TRIES
    run = make_run(send_offsets_to_transaction=[retriable() for _ in range(tries)])
    assert run.deliver(BATCH) is False
    old, new = run.producers
    assert old.sent_offsets == [(NEXT_OFFSETS, GROUP_METADATA)] * tries
    assert "commit_transaction" not in old.calls and new.calls == ["init_transactions"]
    assert run.count("recreated") == 1 and run.source.rewinds == 1


# --- a call that ignores its timeout ----------------------------------------------------------


@pytest.fixture
def stuck_commit(monkeypatch: pytest.MonkeyPatch) -> Iterator[Run]:
    """``commit_transaction`` blocks until released; a fake clock moves 1 s per reading and the
    main thread looks at the call every 10 ms of real time."""
    monkeypatch.setattr(delivery, "_WATCH_EVERY_S", 0.01)
    ticks = itertools.count()
    run = Run(
        blocking=("commit_transaction",),
        clock=lambda: float(next(ticks)),
        assignment=ASSIGNED,
    )
    yield run
    run.release()


def test_a_stuck_commit_is_left_behind_with_its_producer(stuck_commit: Run) -> None:
    run = stuck_commit
    assert run.deliver(BATCH) is False
    old, new = run.producers
    assert old.calls[-1] == "commit_transaction"  # still blocked; never touched again
    assert new.calls == ["init_transactions"]
    assert run.source.rewinds == 1 and run.count("recreated") == 1
    new.blocking = ()
    assert run.deliver(BATCH) is True and run.producer is new


def test_producers_left_behind_in_a_row_stop_the_worker(stuck_commit: Run) -> None:
    run = stuck_commit
    for _ in range(MAX_ABANDONED_PRODUCERS):
        assert run.deliver(BATCH) is False
    with pytest.raises(BrokerError, match="giving up"):
        run.deliver(BATCH)
    assert len(run.producers) == MAX_ABANDONED_PRODUCERS + 1


def test_a_committed_transaction_resets_the_count_of_producers_left_behind(
    stuck_commit: Run,
) -> None:
    run = stuck_commit
    for _ in range(2):
        for _ in range(MAX_ABANDONED_PRODUCERS):
            assert run.deliver(BATCH) is False
        run.producer.blocking = ()
        assert run.deliver(BATCH) is True  # a long-lived worker survives the next outage too
        run.blocking = run.producer.blocking = ("commit_transaction",)
    assert run.count("recreated") == 2 * MAX_ABANDONED_PRODUCERS
