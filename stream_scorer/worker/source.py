"""Source: the group consumer, handing out batches and committing delivered offsets.

Rebalance and broker errors are kept as values for the main loop to raise.

Offsets: ``enable.auto.offset.store`` is off, so only offsets the worker stores — those whose
records' outputs the broker acknowledged — are ever committed. librdkafka's auto-commit commits
them periodically, for revoked partitions before they move, and when the consumer closes.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    TopicPartition,
)

from stream_scorer.errors import BrokerError, broker_unreachable
from stream_scorer.kafka.access import (
    AUTHORIZATION_CODES,
    Grant,
    denied,
    principal_of,
    refused_connection,
)
from stream_scorer.logs import client_logger
from stream_scorer.stages.records import DeadLetter, Message
from stream_scorer.worker.lag import LagTracker
from stream_scorer.worker.metrics import Metrics
from stream_scorer.worker.offsets import Partitions

log = logging.getLogger(__name__)

#: Called with partitions about to be revoked (cleanly: commit what is done) or lost.
RevokeHook = Callable[[Partitions], None]


class ConsumerErrors:
    """The consumer's ``error_cb``, shared by the group and the share-group sources.

    Records, never raises: a refused connection or a fatal error is kept in ``_errors`` for the
    loop to raise (``raise_errors``); all brokers down starts ``_down_since``; anything else is
    logged.
    """

    _settings: dict[str, str]
    _topic: str
    _errors: list[BrokerError]
    _down_since: float | None
    _broker_seen: bool
    _unreachable_timeout: float
    _client_log: logging.Logger

    def _on_error(self, err: KafkaError) -> None:
        refused = refused_connection(err, self._settings)
        if refused is not None:  # the same on every attempt: stop instead of retrying
            if not self._errors:
                self._errors.append(refused)
            return
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            self._down_since = self._down_since or time.monotonic()
        if err.fatal():
            self._errors.append(BrokerError(f"fatal consumer error: {err}", topic=self._topic))
        else:
            self._client_log.warning("kafka: %s", err)

    def _saw_brokers(self, stats: Mapping[str, Any]) -> None:
        """From librdkafka's statistics: a broker is up, so they are not all down."""
        brokers = stats.get("brokers", {}).values()
        if any(b.get("state") == "UP" and b.get("nodeid", -1) >= 0 for b in brokers):
            self._down_since = None
            self._broker_seen = True

    def raise_errors(self) -> None:
        """Raise a recorded fatal error, or one when no broker answered for too long."""
        if self._errors:
            raise self._errors[0]
        if self._down_since is not None:
            down = time.monotonic() - self._down_since
            if down > self._unreachable_timeout:
                bootstrap = self._settings.get("bootstrap.servers", "")
                raise broker_unreachable(bootstrap, down, self._unreachable_timeout)


class Source(ConsumerErrors):
    """A subscribed consumer that hands out batches."""

    def __init__(
        self,
        settings: dict[str, str],
        topic: str,
        metrics: Metrics,
        *,
        unreachable_timeout_s: float,
        on_revoke: RevokeHook,
        on_lost: RevokeHook,
        extra_topics: Sequence[str] = (),
    ) -> None:
        """Prepare a consumer; it is created and subscribed on ``__enter__``.

        ``extra_topics``: more topics (names, or ``^`` regular expressions) for the same group.
        """
        self._settings = settings
        self._topic = topic
        self._extra_topics = tuple(extra_topics)
        self._metrics = metrics
        self._unreachable_timeout = unreachable_timeout_s
        self._on_revoke_hook = on_revoke
        self._on_lost_hook = on_lost
        self._errors: list[BrokerError] = []
        self._down_since: float | None = None
        self._assigned: set[tuple[str, int]] = set()
        self._consumer: Any = None
        self._broker_seen = False  # a broker answered since start (statistics or assignment)
        self._client_log = client_logger("consumer")
        self.joined = False  # an assignment (possibly empty) has been received
        #: Rebalance events so far (assignments, revocations, losses; empty ones too).
        self.rebalances = 0
        self._group_steady = True  # per the last statistics (none yet: as far as known)
        self._starts: dict[tuple[str, int], int] = {}  # where unread partitions start
        #: Per-partition lag in records and seconds (``stream_scorer.worker.lag``).
        self.lag = LagTracker()
        self.backlog = None  # a share group's (``worker.share.ShareBacklog``); the lag says it

    # --- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> Source:
        settings: dict[str, Any] = dict(self._settings)
        settings["error_cb"] = self._on_error
        settings["stats_cb"] = self._on_stats
        settings["logger"] = self._client_log  # its lines as log events, repeats summarised
        try:
            self._consumer = Consumer(settings)
            self._consumer.subscribe(
                [self._topic, *self._extra_topics],
                on_assign=self._assigned_cb,
                on_revoke=self._revoked_cb,
                on_lost=self._lost_cb,
            )
        except KafkaException as exc:
            raise BrokerError(f"cannot create the consumer: {exc}", topic=self._topic) from exc
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._consumer is not None:
            try:
                self._consumer.close()  # commits stored offsets and leaves the group
            except (KafkaException, RuntimeError) as err:
                log.warning("consumer close failed: %s", err)
            self._consumer = None

    # --- callbacks: never raise ------------------------------------------------------------
    def _on_stats(self, stats_json: str) -> None:
        try:
            stats = json.loads(stats_json)
            self.lag.update_from_stats(stats, self.assignment)
            group = stats.get("cgrp")
            if group:
                self._group_steady = (
                    group.get("state") == "up" and group.get("join_state") == "steady"
                )
            self._saw_brokers(stats)
        except Exception as exc:  # statistics are advisory; never let them break the loop
            log.warning("cannot parse librdkafka statistics: %s", exc)

    def _assigned_cb(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        self._assigned.update((p.topic, p.partition) for p in partitions)
        self.joined = self._broker_seen = True
        self.rebalances += 1
        self._metrics.assigned_partitions.set(len(self._assigned))
        log.info(
            "assigned %s",
            sorted(p.partition for p in partitions),
            extra={"topic": self._topic, "assigned": len(self._assigned)},
        )

    def _drop(self, partitions: list[TopicPartition], hook: RevokeHook, what: str) -> None:
        tps = [(p.topic, p.partition) for p in partitions]
        try:
            hook(tps)
        except Exception as exc:  # recorded, raised by the main loop
            self._errors.append(BrokerError(f"handling {what} partitions failed: {exc}"))
        self._assigned.difference_update(tps)
        self.rebalances += 1
        for tp in tps:
            self._starts.pop(tp, None)
        self.lag.forget(tps)
        self._metrics.forget_partitions(tps)
        self._metrics.assigned_partitions.set(len(self._assigned))
        log.info(
            "%s %s",
            what,
            sorted(p for _t, p in tps),
            extra={"topic": self._topic, "assigned": len(self._assigned)},
        )

    def _revoked_cb(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        self._drop(partitions, self._on_revoke_hook, "revoked")

    def _lost_cb(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        self._drop(partitions, self._on_lost_hook, "lost")

    # --- the main loop's calls -------------------------------------------------------------
    def poll_batch(self, max_records: int, max_wait_s: float) -> list[Message]:
        """Return up to ``max_records`` records, waiting at most ``max_wait_s`` for a full batch.

        Raises:
            BrokerError: a non-retriable consume error (unknown topic, authorization, …).
        """
        try:
            messages = self._consumer.consume(num_messages=max_records, timeout=max_wait_s)
        except KafkaException as exc:
            raise BrokerError(f"consume failed: {exc}", topic=self._topic) from exc
        batch: list[Message] = []
        for msg in messages:
            err = msg.error()
            if err is None:
                batch.append(msg)
            elif err.code() == KafkaError._PARTITION_EOF:
                continue
            elif err.retriable() or (not err.fatal() and err.code() < 0):
                log.warning("consume: %s", err)
            elif err.code() in AUTHORIZATION_CODES:
                raise self._denied(err)
            else:
                raise BrokerError(
                    f"consume error: {err}", topic=msg.topic(), partition=msg.partition()
                )
        if batch:
            self._down_since = None
            self.lag.consumed(batch)
        return batch

    def split(self, batch: list[Message]) -> tuple[list[Message], list[DeadLetter]]:
        """The records to score and those not to (none: ``ShareSource.split`` has some)."""
        return batch, []

    def _denied(self, err: KafkaError) -> BrokerError:
        """The error for an authorization refusal of the consumer (its topic or group)."""
        if AUTHORIZATION_CODES.get(err.code()) == "group":
            need = Grant("group", str(self._settings.get("group.id", "")), "member")
        else:
            need = Grant("topic", self._topic, "read")
        return denied(err, need, principal_of(self._settings)) or BrokerError(str(err))

    def store(self, offsets: list[tuple[str, int, int]]) -> None:
        """Store ``(topic, partition, next_offset)`` for commit; skips unassigned partitions."""
        tps = [TopicPartition(t, p, o) for t, p, o in offsets if (t, p) in self._assigned]
        for tp in tps:
            self.lag.committed(tp.topic, tp.partition, tp.offset)
        if tps:
            try:
                self._consumer.store_offsets(offsets=tps)
            except KafkaException as exc:
                log.warning("store_offsets: %s", exc)

    def mark_committed(self, offsets: list[tuple[str, int, int]]) -> None:
        """Tell the lag tracker ``(topic, partition, next_offset)`` were committed elsewhere.

        For commits that do not go through ``store`` (exactly-once: the offsets are committed
        by the producer's transaction, which the consumer's statistics do not see).
        """
        for topic, partition, offset in offsets:
            if (topic, partition) in self._assigned:
                self.lag.committed(topic, partition, offset)

    def commit(self, offsets: list[tuple[str, int, int]] | None = None) -> None:
        """Commit ``(topic, partition, next_offset)`` now, or every stored offset when ``None``.

        A failed commit is logged, not raised: during a cooperative rebalance the broker may
        refuse it with an invalid generation (librdkafka#3306); the records are then redelivered
        to the partition's next owner (at-least-once).
        """
        try:
            if offsets is None:
                self._consumer.commit(asynchronous=False)
            elif offsets:
                tps = [TopicPartition(t, p, o) for t, p, o in offsets]
                self._consumer.commit(offsets=tps, asynchronous=False)
        except KafkaException as exc:
            err = exc.args[0] if exc.args else exc
            if isinstance(err, KafkaError) and err.code() == KafkaError._NO_OFFSET:
                return
            log.warning("commit failed (records will be redelivered): %s", err)

    def group_metadata(self) -> Any:
        """The consumer's group metadata, for ``send_offsets_to_transaction``."""
        return self._consumer.consumer_group_metadata()

    def rewind(self, timeout_s: float = 30.0) -> None:
        """Seek every assigned partition back to its committed offset (after an abort).

        Raises:
            BrokerError: the committed offsets cannot be read or a seek is refused.
        """
        tps = [TopicPartition(t, p) for t, p in sorted(self._assigned)]
        self._starts.clear()
        if not tps:
            return
        try:
            committed = self._consumer.committed(tps, timeout=timeout_s)
            for tp in committed:
                offset = tp.offset if tp.offset >= 0 else OFFSET_BEGINNING
                self._consumer.seek(TopicPartition(tp.topic, tp.partition, offset))
        except KafkaException as exc:
            raise BrokerError(f"cannot rewind to the committed offsets: {exc}") from exc

    def pause(self) -> None:
        """Stop fetching from every assigned partition (the producer is backed up)."""
        self._set_paused(True)

    def resume(self) -> None:
        """Fetch again from every assigned partition."""
        self._set_paused(False)

    def _set_paused(self, paused: bool) -> None:
        tps = [TopicPartition(t, p) for t, p in sorted(self._assigned)]
        if not tps:
            return
        try:
            (self._consumer.pause if paused else self._consumer.resume)(tps)
        except KafkaException as exc:
            log.warning("%s failed: %s", "pause" if paused else "resume", exc)

    def fetched_to_end(self, timeout_s: float = 10.0) -> bool:
        """Whether every assigned partition has nothing left to read (True without partitions).

        A partition has nothing left to read when the next offset this worker would read is at
        its high watermark as of the last fetch: the position after the last record handed
        out (librdkafka moves it past transaction markers and aborted records), or, before
        any, where reading starts (the committed offset, else where ``auto.offset.reset``
        points). Records of a transaction still open upstream count as left to read. A
        partition not fetched yet, or whose start cannot be read, is not at its end.
        """
        if not self._assigned:
            return True
        tps = [TopicPartition(t, p) for t, p in sorted(self._assigned)]
        try:
            positions = self._consumer.position(tps)
            for tp in positions:
                marks = self._consumer.get_watermark_offsets(tp, cached=True)
                if not marks or marks[1] < 0:
                    return False  # not fetched yet
                low, high = marks
                position = tp.offset
                if position < 0:
                    position = self._start(tp.topic, tp.partition, low, high, timeout_s)
                if position is None or position < high:
                    return False
        except KafkaException as exc:
            log.debug("cannot tell whether the partitions are read to their end: %s", exc)
            return False
        return True

    def _start(
        self, topic: str, partition: int, low: int, high: int, timeout_s: float
    ) -> int | None:
        """Where reading a partition nothing was read from yet starts (None: unknown)."""
        start = self._starts.get((topic, partition))
        if start is None:
            (done,) = self._consumer.committed([TopicPartition(topic, partition)], timeout_s)
            if done.offset >= 0:
                start = max(done.offset, low) if low >= 0 else done.offset
            elif str(self._settings.get("auto.offset.reset", "")) in ("latest", "largest", "end"):
                start = high
            elif low >= 0:
                start = low
            else:
                return None
            self._starts[(topic, partition)] = start
        return start

    @property
    def group_settled(self) -> bool:
        """No rebalance in progress, per the last statistics (True when there are none)."""
        return self._group_steady

    @property
    def broker_reachable(self) -> bool:
        """A broker has answered since start and not every broker is down now."""
        return self._broker_seen and self._down_since is None

    @property
    def assignment(self) -> set[tuple[str, int]]:
        """Partitions currently assigned."""
        return set(self._assigned)
