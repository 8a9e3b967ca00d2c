"""Delivery modes: when a batch's outputs count as delivered and its input offsets move.

``AtLeastOnce``: outputs are produced asynchronously; an input offset is stored (and then
committed by auto-commit, on revoke and on close) only after the broker acknowledged the
record's prediction or dead letter. A crash repeats at most the records not yet committed.

``ExactlyOnce``: each batch's predictions, dead letters and input offsets go in one Kafka
transaction. Abortable errors abort it and rewind the consumer to the committed offsets;
ambiguous ones (timeouts) re-create the producer, whose ``init_transactions`` finishes or aborts
the previous incarnation's transaction first; a fenced producer stops the worker. A transactional
call that blocks past its timeout is left behind with its producer for a new one; after a
lost broker connection, when ``send_offsets_to_transaction`` can wait forever (librdkafka#5456,
#5511), a call still blocked soon after the brokers answer again is left behind then, and so
is any later one for a while after the first commit (``ProducerEvents``).
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Protocol

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from stream_scorer.errors import AccessDeniedError, BrokerError, FencedError, broker_unreachable
from stream_scorer.kafka.access import AUTHORIZATION_CODES, Grant, denied
from stream_scorer.logs import client_logger
from stream_scorer.stages.multi import MultiResult, as_multi
from stream_scorer.stages.pipeline import BatchResult
from stream_scorer.worker.metrics import Metrics
from stream_scorer.worker.offsets import OffsetTracker, Partitions, Position, Ticket
from stream_scorer.worker.sink import Producer, Sink, SinkContext

log = logging.getLogger(__name__)

_FENCED_CODES = frozenset(
    {
        KafkaError._FENCED,
        KafkaError.PRODUCER_FENCED,
        KafkaError.INVALID_PRODUCER_EPOCH,
    }
)
_SEND_OFFSETS_TRIES = 5
#: Transactions rolled back in a row before the worker gives up (a dead-letter topic that keeps
#: refusing writes, a broker that keeps failing): the worker exits non-zero.
MAX_FAILED_TRANSACTIONS = 5
#: Producers left blocked in a call (past its timeout, or after a reconnection) without a
#: transaction committing in between, before the worker exits instead.
MAX_ABANDONED_PRODUCERS = 3
#: Beyond a call's own timeout, how long to wait before deciding it ignores it.
_GRACE_S = 5.0
#: After a lost broker connection: how long a transactional call may wait with the brokers
#: answering again before it counts as stuck (librdkafka#5456, #5511) and is left behind,
#: instead of after its full timeout. Once connected the calls take milliseconds; the grace
#: leaves a restarted broker's coordinators time to load their state.
RECONNECTED_GRACE_S = 5.0
#: How long after the brokers answer again the transactional calls stay under that grace. The
#: first commit after a reconnection does not end it: the next ``send_offsets_to_transaction``
#: can still hang (seen after broker restarts, held until the timeout fallback). Only a commit
#: once the brokers have answered this long puts the loss behind.
RECONNECTED_WATCH_S = 60.0
#: While ``send_offsets_to_transaction`` runs: how often the main thread serves the producer's
#: callbacks (its log lines and errors keep their time) and, after a lost connection, asks a
#: broker for metadata (waiting at most this long for the answer).
_WATCH_EVERY_S = 0.5
#: The producer's errors that mean a broker connection was lost.
_LOST_CODES = frozenset({KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN})
_PRODUCER_LOG = client_logger("producer")
#: librdkafka's line when the transaction coordinator refuses a partition: its topic, then the
#: client's own text of the error code (``KafkaError(code).str()``).
_ADD_PARTITION_REFUSED = re.compile(r'Failed to add partition "([^"]+)" \[\d+\] to transaction: ')
#: The codes of a refused request: an authorization code (the worker's own error names what to
#: grant) and "operation not attempted" (the request's other partitions, skipped because of it).
_REFUSAL_CODES = (*AUTHORIZATION_CODES, KafkaError.OPERATION_NOT_ATTEMPTED)
#: A code's text, as librdkafka writes it into its log lines, back to the code.
_REFUSAL_TEXTS = {KafkaError(code).str(): code for code in _REFUSAL_CODES}


def logged_refusal(text: str) -> tuple[int, str | None] | None:
    """The refusal a librdkafka log line reports: its code and, if the line names it, the topic.

    Only the log says it: ``AddPartitionsToTxn`` refused for one topic surfaces from the
    transactional call as a bare ``TOPIC_AUTHORIZATION_FAILED`` (no topic), and the other
    partitions' ``OPERATION_NOT_ATTEMPTED`` not at all. The line's error is matched against
    the client's own text of each code (``KafkaError(code).str()``), not free words.
    """
    code = next((c for t, c in _REFUSAL_TEXTS.items() if t in text), None)
    if code is None:
        return None
    match = _ADD_PARTITION_REFUSED.search(text)
    topic = match.group(1) if match and AUTHORIZATION_CODES.get(code) == "topic" else None
    return code, topic


class TransactionalProducer(Producer, Protocol):
    """The transactional parts of confluent-kafka's ``Producer``."""

    def init_transactions(self, timeout: float = ...) -> None: ...  # noqa: D102
    def begin_transaction(self) -> None: ...  # noqa: D102
    def send_offsets_to_transaction(  # noqa: D102
        self, positions: list[TopicPartition], group_metadata: Any, timeout: float = ...
    ) -> None: ...
    def commit_transaction(self, timeout: float = ...) -> None: ...  # noqa: D102
    def abort_transaction(self, timeout: float = ...) -> None: ...  # noqa: D102
    def purge(  # noqa: D102
        self, in_queue: bool = ..., in_flight: bool = ..., blocking: bool = ...
    ) -> None: ...
    def list_topics(self, topic: str | None = ..., timeout: float = ...) -> Any: ...  # noqa: D102


class Input(Protocol):
    """What delivery needs of the consumer (``worker.source.Source``): offsets and flow."""

    @property
    def assignment(self) -> set[tuple[str, int]]: ...  # noqa: D102
    def store(self, offsets: list[Position]) -> None: ...  # noqa: D102
    def commit(self, offsets: list[Position] | None = None) -> None: ...  # noqa: D102
    def mark_committed(self, offsets: list[Position]) -> None: ...  # noqa: D102
    def pause(self) -> None: ...  # noqa: D102
    def resume(self) -> None: ...  # noqa: D102
    def group_metadata(self) -> Any: ...  # noqa: D102
    def rewind(self, timeout_s: float = ...) -> None: ...  # noqa: D102


class Delivery(Protocol):
    """A delivery mode: when a batch's outputs count as delivered and its offsets move.

    The main loop calls ``deliver`` once per batch, ``service`` every iteration, the consumer's
    rebalance callbacks ``on_revoke``/``on_lost``, and ``drain`` once at the end.
    """

    #: True while the input is paused because outputs await acknowledgement.
    paused: bool

    def deliver(self, ticket: Ticket, result: BatchResult | MultiResult) -> bool:
        """Publish a batch's outputs; False when it was rolled back (to be consumed again)."""
        ...

    def service(self) -> None:
        """Serve delivery reports; raise a recorded failure; move offsets; apply back-pressure."""
        ...

    def on_revoke(self, partitions: Partitions) -> None:
        """Partitions leave cleanly: settle what is theirs."""
        ...

    def on_lost(self, partitions: Partitions) -> None:
        """Partitions were lost (they may belong to another member already): commit nothing."""
        ...

    def drain(self) -> int:
        """Deliver what is in flight and commit it; return how many outputs stayed unacked."""
        ...


class _StuckCall(Exception):
    """A transactional call outlived its timeout, or stayed blocked after a reconnection."""


class ProducerEvents:
    """The producer's callbacks (``logger``, ``error_cb``) and what they and the probes tell.

    Its log lines and errors go to ``librdkafka.producer``; from them it notes a lost broker
    connection (``lost``) and a topic the transaction coordinator refused (``refused_topic``).
    ``answered`` and ``unanswered`` come from the metadata requests the main thread sends while
    a transactional call waits, ``committed`` from a committed transaction (proof the brokers
    answer; once they have for ``RECONNECTED_WATCH_S``, the loss is behind). It answers: how
    long has a call been waiting with the brokers answering again, after a connection was lost?
    """

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, watch_s: float = RECONNECTED_WATCH_S
    ) -> None:
        """Start with nothing lost; ``clock`` gives the time in seconds."""
        self._clock = clock
        self._watch_s = watch_s
        self.lost_at: float | None = None  # a connection was lost, not yet put behind
        self.back_since: float | None = None  # the brokers answer again since
        #: The topic the transaction coordinator last refused to add (librdkafka says which
        #: only in its log line, not in the error the transactional call raises).
        self.refused_topic: str | None = None

    def on_error(self, err: KafkaError) -> None:
        """The producer's ``error_cb``: log the error (repeats summarised); note a lost link."""
        if err.code() in _LOST_CODES:
            self.lost()
        _PRODUCER_LOG.warning("kafka: %s", err)

    def callbacks(self) -> dict[str, Any]:
        """Producer settings for the callbacks: its log lines and errors, repeats summarised."""
        return {"logger": self, "error_cb": self.on_error}

    def log(self, level: int, fmt: str, *args: Any) -> None:
        """The producer's ``logger``: its lines go to ``librdkafka.producer``.

        An authorization refusal is noted (``refused_topic``) and logged as a warning, like
        the "operation not attempted" of the other partitions of the refused request: the
        worker's own error line says what is missing and what to grant.
        """
        try:  # the one condition read from the log: the refused topic (``logged_refusal``)
            refusal = logged_refusal(fmt % args)
            if refusal is not None:
                level = min(level, logging.WARNING)
                if refusal[1] is not None:
                    self.refused_topic = refusal[1]
        except Exception:  # a log callback never raises
            pass
        _PRODUCER_LOG.log(level, fmt, *args)

    def lost(self) -> None:
        """A broker connection was lost (or could not be made)."""
        self.lost_at, self.back_since = self._clock(), None

    def answered(self) -> None:
        """A broker answered: after a loss, the brokers are back from now on."""
        if self.lost_at is not None and self.back_since is None:
            self.back_since = self._clock()

    def unanswered(self) -> None:
        """No broker answered: not back (yet)."""
        self.back_since = None

    def committed(self) -> None:
        """A transaction committed: the brokers answer; what was refused is behind us.

        A lost connection is put behind only once the brokers have answered for
        ``RECONNECTED_WATCH_S``: until then the calls that follow stay under the short grace.
        """
        self.refused_topic = None
        if self.lost_at is None:
            return
        self.answered()
        if self.back_since is not None and self._clock() - self.back_since >= self._watch_s:
            self.lost_at = self.back_since = None

    @property
    def watching(self) -> bool:
        """Whether a lost connection is not behind us yet (calls get the short grace)."""
        return self.lost_at is not None

    def waited_back(self, started: float) -> float:
        """Seconds a call started at ``started`` has waited with the brokers back after a loss.

        0 when no lost connection is being watched or no broker answers now.
        """
        if self.lost_at is None or self.back_since is None:
            return 0.0
        return self._clock() - max(started, self.back_since)


#: Called every ``_WATCH_EVERY_S`` while a call runs, with when it started: the reason it is
#: stuck, or None to keep waiting.
Watch = Callable[[float], str | None]


def bounded(
    call: Callable[[], None],
    timeout_s: float,
    what: str,
    *,
    watch: Watch | None = None,
    every_s: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Run a blocking client call, giving up after ``timeout_s`` or when ``watch`` says so.

    The call runs in a thread of its own (it keeps running when given up on); this thread
    waits in slices of ``every_s`` (default ``_WATCH_EVERY_S``) and asks ``watch`` in between.
    librdkafka's ``send_offsets_to_transaction`` can ignore its timeout and block forever when
    the group coordinator went away (librdkafka#5456, #5511; seen here after a broker restart).

    Raises:
        _StuckCall: the call did not return in time, or ``watch`` found it stuck.
    """
    outcome: list[BaseException | None] = []
    finished = threading.Event()

    def run() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as exc:  # handed to the caller's thread
            outcome.append(exc)
        finally:
            finished.set()

    every = _WATCH_EVERY_S if every_s is None else every_s
    started = clock()
    thread = threading.Thread(target=run, name=what, daemon=True)
    thread.start()
    while not finished.wait(max(0.0, min(every, started + timeout_s - clock()))):
        if clock() - started >= timeout_s:
            raise _StuckCall(f"{what} did not return within {timeout_s:.0f} s")
        reason = None if watch is None else watch(started)
        if reason is not None and not finished.is_set():
            raise _StuckCall(f"{what} {reason}")
    if outcome[0] is not None:
        raise outcome[0]


def _metadata_error(producer: TransactionalProducer, timeout_s: float) -> str | None:
    """Why no broker answers the producer's metadata request, or None when one answers."""
    try:
        producer.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        err = kafka_error(exc)
        return str(exc) if err is None else err.str()
    return None


def kafka_error(exc: BaseException) -> KafkaError | None:
    """Return the ``KafkaError`` behind ``exc`` (following ``raise ... from``), if any."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, KafkaException) and seen.args and isinstance(seen.args[0], KafkaError):
            return seen.args[0]
        seen = seen.__cause__
    return None


class AtLeastOnce:
    """Asynchronous produce; offsets stored once every output of a record is acknowledged."""

    def __init__(
        self,
        sink: Sink,
        source: Input,
        tracker: OffsetTracker,
        *,
        max_in_flight: int,
        flush_timeout_s: float,
        wait: bool = False,
    ) -> None:
        """Deliver through ``sink`` and store offsets on ``source``.

        ``wait``: each ``deliver`` waits for the batch's acknowledgements and stores them (a
        share group's records must all be acknowledged before the next poll).
        """
        self.sink = sink
        self._source = source
        self._tracker = tracker
        self._max_in_flight = max_in_flight
        self._flush_timeout = flush_timeout_s
        self._wait = wait
        self.paused = False
        self._drained = False

    def deliver(self, ticket: Ticket, result: BatchResult | MultiResult) -> bool:
        """Produce the batch's outputs (True); their acknowledgements move the watermark later.

        Never rolled back: an output the broker refuses stops the worker (``service``).
        """
        self.sink.publish_batch(as_multi(result), ticket)
        if self._wait:
            self.sink.flush(self._flush_timeout)
            self.service()
        return True

    def service(self) -> None:
        """Serve delivery reports, raise failures, store offsets, apply back-pressure."""
        self.sink.poll(0)
        self.sink.raise_errors()
        self._source.store(self._tracker.take_committable())
        pending = self._tracker.pending
        if not self.paused and pending >= self._max_in_flight:
            log.warning("%d records await acknowledgement: pausing input partitions", pending)
            self._source.pause()
            self.paused = True
        elif self.paused and pending <= self._max_in_flight // 2:
            log.info("producer caught up (%d in flight): resuming input partitions", pending)
            self._source.resume()
            self.paused = False

    def on_revoke(self, partitions: Partitions) -> None:
        """Deliver what is in flight, then commit the revoked partitions' watermarks.

        After ``drain`` (the consumer's close revokes everything) there is nothing left to do:
        drain committed what was delivered, and a second synchronous commit from inside
        ``close()`` can block forever (seen when an output was still unacknowledged).
        """
        if self._drained:
            self._tracker.forget(partitions)
            return
        self.sink.flush(self._flush_timeout)
        offsets = self._tracker.committable(partitions)
        self._source.store(offsets)
        self._source.commit(offsets)
        self._tracker.forget(partitions)

    def on_lost(self, partitions: Partitions) -> None:
        """Partitions already belong to someone else: commit nothing, forget them."""
        self._tracker.forget(partitions)

    def drain(self) -> int:
        """Deliver what is in flight and commit it; return how many outputs stayed unacked."""
        self._drained = True
        remaining = self.sink.flush(self._flush_timeout)
        self.sink.raise_errors()
        self._source.store(self._tracker.take_committable())
        self._source.commit()
        return remaining


class ExactlyOnce:
    """One transaction per batch: outputs and input offsets commit together or not at all."""

    def __init__(
        self,
        make_producer: Callable[[], TransactionalProducer],
        ctx: SinkContext,
        source: Input,
        tracker: OffsetTracker,
        metrics: Metrics,
        *,
        timeout_s: float,
        bootstrap: str,
        unreachable_timeout_s: float,
        producer_events: ProducerEvents | None = None,
        clock: Callable[[], float] = time.monotonic,
        group_id: str = "",
        transactional_id: str = "",
        principal: str = "",
        grants: Sequence[Grant] = (),
    ) -> None:
        """Create the transactional producer and initialise its transactions.

        Args:
            make_producer: creates a transactional producer (again after ambiguous errors).
            ctx: topics and identity for the outputs.
            source: the consumer whose offsets commit in the transactions.
            tracker: the in-flight records.
            metrics: the worker's metrics.
            timeout_s: ``delivery.transaction_timeout_s``, the bound on each transactional call.
            bootstrap: ``kafka.bootstrap_servers``, named when no broker answers.
            unreachable_timeout_s: ``kafka.unreachable_timeout_s``: ``init_transactions`` gives
                up after this long (or ``timeout_s`` if shorter) when no broker answers.
            producer_events: the producers' callbacks (``ProducerEvents.callbacks``).
            clock: the time in seconds.
            group_id: ``input.group_id`` (its offsets commit in the transactions), named when
                the broker refuses it.
            transactional_id: the producer's, named when the broker refuses it.
            principal: ``User:<name>`` the producer authenticates as, named when refused.
            grants: what the worker role is granted (``kafka.access.role_grants``), for the hint.
        """
        self._make_producer = make_producer
        self._ctx = ctx
        self._source = source
        self._tracker = tracker
        self._metrics = metrics
        self._timeout = timeout_s
        self._clock = clock
        self._producer_events = producer_events or ProducerEvents(clock)
        self._bootstrap = bootstrap
        self._unreachable_timeout = unreachable_timeout_s
        self._group_id = group_id
        self._transactional_id = transactional_id
        self._principal = principal
        self._grants = tuple(grants)
        self._failed_in_a_row = 0
        self._abandoned = 0
        self.paused = False  # transactions are synchronous: never backed up
        self._producer: TransactionalProducer = self._start_producer()
        self.sink = Sink(self._producer, ctx, tracker, metrics)

    def _start_producer(self) -> TransactionalProducer:
        """A new producer with its transactions initialised.

        ``init_transactions`` first waits at most ``kafka.unreachable_timeout_s`` (or the
        transaction timeout if shorter). When it timed out and no broker answers a metadata
        request either, the broker is unreachable and the error says so; otherwise the call is
        resumed for the rest of the transaction timeout (a coordinator still loading).

        Raises:
            FencedError: another producer took the transactional id.
            BrokerError: no broker reachable, or transactions could not be initialised.
        """
        producer = self._make_producer()
        started = time.monotonic()
        first = min(self._timeout, self._unreachable_timeout)
        try:
            try:
                producer.init_transactions(first)
            except KafkaException as exc:
                err = kafka_error(exc)
                if err is None or err.code() != KafkaError._TIMED_OUT:
                    raise
                why = _metadata_error(producer, min(_GRACE_S, self._unreachable_timeout))
                if why is not None:
                    down = time.monotonic() - started
                    raise broker_unreachable(
                        self._bootstrap, down, self._unreachable_timeout, why
                    ) from exc
                if first >= self._timeout:
                    raise
                producer.init_transactions(self._timeout - first)  # documented: resume it
        except KafkaException as exc:
            refused = self._denied(exc, producer)
            raise (refused or self._fatal(exc, "cannot initialise transactions")) from exc
        return producer

    def _denied(
        self, exc: BaseException, producer: TransactionalProducer | None = None
    ) -> AccessDeniedError | None:
        """The error when the broker refused an ACL (the call's or an output's), else None."""
        if isinstance(exc, AccessDeniedError):  # the sink named the topic produce() refused
            return exc
        if producer is None:
            with contextlib.suppress(Exception):
                self.sink.poll(0)  # the delivery reports: which output was refused
            for recorded in self.sink.errors:
                if isinstance(recorded, AccessDeniedError):
                    return recorded  # names the topic that refused the output
        err = kafka_error(exc)
        if err is None or err.code() not in AUTHORIZATION_CODES:
            return None
        kind = AUTHORIZATION_CODES[err.code()]
        if kind == "group":
            need = Grant("group", self._group_id, "member")
        elif kind == "topic" and self._producer_events.refused_topic is not None:
            need = Grant("topic", self._producer_events.refused_topic, "write")
        elif kind == "topic":  # not said which: the transaction writes both
            out, dlq = self._ctx.output_topic, self._ctx.dead_letter_topic
            return AccessDeniedError(
                f"not authorized to write topic {out!r} or {dlq!r} ({err.name()}): grant WRITE "
                f"and DESCRIBE on both to {self._principal or 'this client'} "
                "(stream-scorer acl grant --role worker)"
            )
        else:
            need = Grant("transactional_id", self._transactional_id, "write")
        return denied(err, need, self._principal, grants=self._grants)

    def _fatal(self, exc: BaseException, what: str) -> BrokerError:
        err = kafka_error(exc)
        if err is not None and (err.code() in _FENCED_CODES or err.fatal()):
            return FencedError(
                f"{what}: fenced by a newer producer with the same transactional id or a newer "
                f"group generation ({err}); stopping this worker"
            )
        return BrokerError(f"{what}: {exc}")

    def deliver(self, ticket: Ticket, result: BatchResult | MultiResult) -> bool:
        """Publish the batch and commit it with its offsets; return False if it was rolled back.

        Raises:
            FencedError: this producer was fenced (another worker took over).
            BrokerError: an unclassified transaction error.
        """
        offsets = [TopicPartition(t, p, o) for t, p, o in ticket.next_offsets]
        try:
            self._producer.begin_transaction()
            self.sink.publish_batch(as_multi(result), ticket)
            self._send_offsets(offsets)
            bounded(
                partial(self._producer.commit_transaction, self._timeout),
                self._timeout + _GRACE_S,
                "commit_transaction",
                watch=partial(self._watch_stuck, serve=False),
                clock=self._clock,
            )
        except Exception as exc:
            self._recover(exc)
            self._failed_in_a_row += 1
            if self._failed_in_a_row >= MAX_FAILED_TRANSACTIONS:
                raise BrokerError(
                    f"{self._failed_in_a_row} transactions in a row rolled back; last error: {exc}"
                ) from exc
            time.sleep(min(0.1 * 2**self._failed_in_a_row, 5.0))  # back off before the retry
            return False
        self._failed_in_a_row = self._abandoned = 0
        self._producer_events.committed()
        self._source.mark_committed([(tp.topic, tp.partition, tp.offset) for tp in offsets])
        self.sink.poll(0)  # serve the delivery reports: metrics, tracker
        self._metrics.transactions.labels("committed").inc()
        return True

    def _send_offsets(self, offsets: list[TopicPartition]) -> None:
        for attempt in range(1, _SEND_OFFSETS_TRIES + 1):
            call = partial(
                self._producer.send_offsets_to_transaction,
                offsets,
                self._source.group_metadata(),
                self._timeout,
            )
            try:
                bounded(
                    call,
                    self._timeout + _GRACE_S,
                    "send_offsets_to_transaction",
                    watch=self._watch_stuck,
                    clock=self._clock,
                )
                return
            except KafkaException as exc:
                err = kafka_error(exc)
                if err is None or not err.retriable() or attempt == _SEND_OFFSETS_TRIES:
                    raise
                log.warning("send_offsets_to_transaction: %s (retrying, same offsets)", err)

    def _watch_stuck(self, started: float, *, serve: bool = True) -> str | None:
        """While a transactional call waits: is it stuck (librdkafka#5456, #5511)?

        With ``serve``, serves the producer (delivery reports, and its log lines and errors on
        time): not during ``commit_transaction``, which serves them itself (flush). After a
        lost connection (``ProducerEvents.watching``, which outlasts the first commit), asks a
        broker for metadata. Stuck: the brokers have answered again for
        ``RECONNECTED_GRACE_S`` while the call kept waiting.
        """
        if serve:
            self.sink.poll(0)
        events = self._producer_events
        if not events.watching:
            return None
        if _metadata_error(self._producer, _WATCH_EVERY_S) is not None:
            events.unanswered()
            return None
        events.answered()
        waited = events.waited_back(started)
        if waited < RECONNECTED_GRACE_S:
            return None
        return (
            f"still blocked {waited:.1f} s after the brokers answered again "
            "(a broker connection was lost)"
        )

    def _recover(self, exc: BaseException) -> None:
        refused = self._denied(exc)
        if refused is not None:  # no retry helps: roll back and stop
            with contextlib.suppress(KafkaException):
                self._producer.abort_transaction(self._timeout)
            self._metrics.transactions.labels("aborted").inc()
            raise refused from exc
        if isinstance(exc, _StuckCall):
            # the blocked call still holds the producer: leave it, fence it with a new one
            self._abandoned += 1
            if self._abandoned > MAX_ABANDONED_PRODUCERS:
                raise BrokerError(f"{exc} again; giving up (librdkafka#5456)") from exc
            log.warning("%s: abandoning this producer for a new one (librdkafka#5456)", exc)
            self._producer = self._start_producer()
            self.sink = Sink(self._producer, self._ctx, self._tracker, self._metrics)
            self._metrics.transactions.labels("recreated").inc()
            self._rewind()
            return
        err = kafka_error(exc)
        if err is None or err.code() in _FENCED_CODES or err.fatal():
            raise self._fatal(exc, "transaction failed") from exc
        if err.txn_requires_abort():
            log.warning("transaction aborted: %s; rewinding to the committed offsets", err)
            try:
                self._producer.abort_transaction(self._timeout)
            except KafkaException as abort_exc:
                log.warning("abort failed (%s): re-creating the producer", abort_exc)
                self._recreate()
            self._metrics.transactions.labels("aborted").inc()
        elif err.retriable():
            log.warning("transaction outcome unknown (%s): re-creating the producer", err)
            self._recreate()
            self._metrics.transactions.labels("recreated").inc()
        else:
            raise self._fatal(exc, "transaction failed") from exc
        self._rewind()

    def _recreate(self) -> None:
        try:
            self._producer.purge(in_queue=True, in_flight=True, blocking=False)
            self._producer.flush(0)
        except Exception as exc:  # the old producer is being dropped anyway
            log.debug("purging the old producer: %s", exc)
        self._producer = self._start_producer()
        self.sink = Sink(self._producer, self._ctx, self._tracker, self._metrics)

    def _rewind(self) -> None:
        self.sink.poll(0)
        self.sink.clear_errors()  # the aborted outputs' purge reports
        self._tracker.forget(list(self._source.assignment))
        self._source.rewind(self._timeout)

    def service(self) -> None:
        """Serve delivery reports (their failures surface through the transaction)."""
        self.sink.poll(0)

    def on_revoke(self, partitions: Partitions) -> None:
        """Nothing to commit: every batch's transaction ended before the next poll."""
        self._tracker.forget(partitions)

    def on_lost(self, partitions: Partitions) -> None:
        """Nothing to commit; forget the partitions."""
        self._tracker.forget(partitions)

    def drain(self) -> int:
        """Nothing is in flight between transactions."""
        self.sink.poll(0)
        return 0
