"""Fakes for unit tests of exactly-once delivery (``stream_scorer.worker.delivery.ExactlyOnce``).

A fake transactional producer that records its calls, raises errors from a script and can block
a call until released; a fake source (the small surface ``ExactlyOnce`` uses); an optional fake
network with a fake clock, where each look at the producer (``poll``, a metadata request)
lets ``STEP_S`` pass. The
offset tracker, metrics and sink context are the real ones.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition
from support import Msg

from stream_scorer.stages.pipeline import BatchResult
from stream_scorer.stages.records import Message, Scored
from stream_scorer.worker.delivery import ExactlyOnce, ProducerEvents
from stream_scorer.worker.metrics import Metrics
from stream_scorer.worker.offsets import OffsetTracker
from stream_scorer.worker.sink import SinkContext

TIMEOUT_S = 20.0  # transaction timeout: a call is given up after this + 5 s
STEP_S = 0.5  # fake time per look at the producer
CTX = SinkContext("out", "dlq", "g", "w", "v1")
#: What the fake source's ``group_metadata`` returns: passed on to the producer untouched.
GROUP_METADATA = object()
#: ``script[call]``: the exceptions the next calls named ``call`` raise, in order, on whichever
#: producer of a run makes them.
Script = dict[str, list[BaseException]]


class Net:
    """A fake clock and a broker that is down from ``down_at`` until ``back_at``."""

    def __init__(self, down_at: float, back_at: float) -> None:
        self.now = 0.0
        self.down_at, self.back_at = down_at, back_at
        self.producer_events = ProducerEvents(self.clock)

    def clock(self) -> float:
        return self.now

    @property
    def down(self) -> bool:
        return self.down_at <= self.now < self.back_at


class FakeProducer:
    """The transactional producer API, recording its calls.

    A scripted error is raised before the call does anything. A call named in ``blocking``
    waits until ``released`` is set (``release`` for every producer of a run, or fake time
    reaching ``release_at``). Produced records are acknowledged when the transaction commits
    and fail with ``_PURGE_QUEUE`` when it aborts or the producer is purged, as librdkafka's
    delivery reports do.
    """

    def __init__(
        self,
        script: Script,
        net: Net | None = None,
        *,
        blocking: Collection[str] = (),
        release_at: float | None = None,
    ) -> None:
        self.script = script
        self.net = net
        self.blocking = blocking
        self.release_at = release_at  # fake time at which a blocked call returns; None: never
        self.released = threading.Event()
        self.reported_down = False
        self.calls: list[str] = []
        self.sent_offsets: list[tuple[list[tuple[str, int, int]], Any]] = []
        self.produced: list[tuple[str, bytes | None]] = []
        self._reports: list[Callable[[Any], None]] = []  # the open transaction's records

    def _call(self, name: str) -> None:
        self.calls.append(name)
        errors = self.script.get(name)
        if errors:
            raise errors.pop(0)
        if name in self.blocking:
            self.released.wait()

    def _report(self, err: KafkaError | None) -> None:
        reports, self._reports = self._reports, []
        for report in reports:
            report(err)

    def init_transactions(self, timeout: float = -1) -> None:
        self._call("init_transactions")

    def begin_transaction(self) -> None:
        self._call("begin_transaction")

    def send_offsets_to_transaction(
        self, positions: list[TopicPartition], metadata: Any, timeout: float = -1
    ) -> None:
        self.sent_offsets.append(([(p.topic, p.partition, p.offset) for p in positions], metadata))
        self._call("send_offsets_to_transaction")

    def commit_transaction(self, timeout: float = -1) -> None:
        self._call("commit_transaction")
        self._report(None)

    def abort_transaction(self, timeout: float = -1) -> None:
        self._call("abort_transaction")
        self._report(KafkaError(KafkaError._PURGE_QUEUE))

    def purge(self, in_queue: bool = True, in_flight: bool = True, blocking: bool = True) -> None:
        self._call("purge")
        self._report(KafkaError(KafkaError._PURGE_QUEUE))

    def produce(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        on_delivery: Callable[[Any, Any], None] | None = None,
        **kwargs: Any,
    ) -> None:
        self.produced.append((topic, value))
        if on_delivery is not None:
            self._reports.append(lambda err: on_delivery(err, Msg(value, k=key, t=topic)))

    def flush(self, timeout: float = -1) -> int:
        return 0

    def poll(self, timeout: float = 0) -> int:
        """On a fake network, time passes; its error callback hears of an outage once."""
        net = self.net
        if net is None:
            return 0
        net.now += STEP_S
        if net.down and not self.reported_down:
            self.reported_down = True
            net.producer_events.on_error(KafkaError(KafkaError._ALL_BROKERS_DOWN))
        if self.release_at is not None and net.now >= self.release_at:
            self.released.set()
        return 0

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any:
        """On a fake network, a metadata request lets ``STEP_S`` pass too (it waits for an
        answer); it fails while the network is down."""
        net = self.net
        if net is None:
            return object()
        net.now += STEP_S
        if self.release_at is not None and net.now >= self.release_at:
            self.released.set()
        if net.down:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT))
        return object()


class FakeSource:
    """What ``ExactlyOnce`` uses of ``Source``, recording rewinds and committed offsets."""

    def __init__(self, assignment: Collection[tuple[str, int]] = ()) -> None:
        self._assignment = set(assignment)
        self.rewinds = 0
        self.committed: list[list[tuple[str, int, int]]] = []

    @property
    def assignment(self) -> set[tuple[str, int]]:
        return set(self._assignment)

    def group_metadata(self) -> Any:
        return GROUP_METADATA

    def mark_committed(self, offsets: list[tuple[str, int, int]]) -> None:
        self.committed.append(list(offsets))

    def rewind(self, timeout_s: float = 30.0) -> None:
        self.rewinds += 1


class Run:
    """An ``ExactlyOnce`` over fake producers; records each producer and when it was made.

    With ``net``, its clock and producer events; else ``clock`` (default the real one).
    """

    def __init__(
        self,
        net: Net | None = None,
        *,
        script: Script | None = None,
        blocking: Collection[str] = (),
        release_at: float | None = None,
        clock: Callable[[], float] | None = None,
        assignment: Collection[tuple[str, int]] = (),
    ) -> None:
        self.net = net
        self.script: Script = {} if script is None else script
        self.blocking = blocking
        self.release_at = release_at
        self.producers: list[FakeProducer] = []
        self.made_at: list[float] = []
        self.metrics = Metrics()
        self.tracker = OffsetTracker()
        self.source = FakeSource(assignment)
        self.clock = clock or (net.clock if net is not None else time.monotonic)
        self.eos = ExactlyOnce(
            self._make,
            CTX,
            self.source,  # type: ignore[arg-type]
            self.tracker,
            self.metrics,
            timeout_s=TIMEOUT_S,
            bootstrap="127.0.0.1:9",
            unreachable_timeout_s=120,
            producer_events=None if net is None else net.producer_events,
            clock=self.clock,
        )

    def _make(self) -> FakeProducer:
        producer = FakeProducer(
            self.script, self.net, blocking=self.blocking, release_at=self.release_at
        )
        self.producers.append(producer)
        self.made_at.append(self.clock())
        return producer

    @property
    def producer(self) -> FakeProducer:
        """The producer in use (the latest made)."""
        return self.producers[-1]

    def deliver(self, batch: Sequence[Message] | None = None) -> bool:
        """Deliver ``batch`` (default: one record at offset 7), every record scored."""
        messages: list[Message] = list(batch) if batch is not None else [Msg(b"x", o=7)]
        ticket = self.tracker.track(messages)
        encoded = [b"p%d" % (m.offset() or 0) for m in messages]
        scored = Scored(messages, encoded, [0] * len(messages))
        return self.eos.deliver(ticket, BatchResult(scored, []))

    def count(self, outcome: str) -> float:
        """``stream_scorer_transactions_total`` for ``outcome``."""
        value = self.metrics.prometheus.get_sample_value(
            "stream_scorer_transactions_total", {"outcome": outcome}
        )
        return value or 0.0

    def release(self) -> None:
        """Let every blocked call return."""
        for producer in self.producers:
            producer.released.set()


def kafka_exception(
    code: int,
    *,
    fatal: bool = False,
    retriable: bool = False,
    txn_requires_abort: bool = False,
) -> KafkaException:
    """A ``KafkaException`` wrapping a ``KafkaError`` classified as librdkafka would."""
    return KafkaException(
        KafkaError(
            code,
            f"fake {KafkaError(code).name()}",
            fatal=fatal,
            retriable=retriable,
            txn_requires_abort=txn_requires_abort,
        )
    )
