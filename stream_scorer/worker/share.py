"""Share-group input (``input.group_type: share``): any partition's records, acknowledged each.

A share group (KIP-932) lends each record to one member under a lock; the member acknowledges
it (ACCEPT: done; RELEASE: give it to someone again) or the lock expires and the broker
delivers it again, counting deliveries. Unlike a consumer group, workers can outnumber
partitions; there is no order within a partition and no transaction (at-least-once only).

How the worker uses it (the same main loop and delivery as a consumer group):

- explicit acknowledgement: a record is ACCEPTed only after the broker acknowledged its output
  (prediction or dead letter), when the delivery stores its batch's "offsets" (``store``);
  librdkafka requires every record of a poll to be acknowledged before the next poll, so the
  delivery waits for each batch's outputs (``AtLeastOnce(wait=True)``);
- a record the broker delivered ``input.delivery_limit`` times is dead-lettered (reason
  ``delivery_limit``) instead of scored again (``split``): the group's
  ``share.delivery.count.limit`` is one above, so the broker never archives it unseen;
- a stop with records not delivered (a failure, a timeout) RELEASEs them: redelivered at once
  instead of after the lock expires;
- the group's start position (``share.auto.offset.reset``, broker default ``latest``) and
  delivery limit are group configs, set at start-up (``configure_group``).

The client's share consumer is a preview (confluent-kafka 2.15+): it says so when created, and
the worker logs it once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

from confluent_kafka import KafkaException

from stream_scorer.errors import BrokerError
from stream_scorer.kafka.topics import TP
from stream_scorer.logs import client_logger
from stream_scorer.stages.records import DeadLetter, Message, Reason
from stream_scorer.worker.lag import LagTracker
from stream_scorer.worker.offsets import Position
from stream_scorer.worker.source import ConsumerErrors

log = logging.getLogger(__name__)

#: Logged once per process: the client's share consumer is a preview.
PREVIEW_WARNING = (
    "input.group_type: share uses confluent-kafka's share consumer, which the client marks "
    '"Preview" (not recommended for production by its authors); consumer groups stay the default'
)
_warned = False

#: Key → value of the group configs a worker sets at start-up.
GroupConfigs = dict[str, str]


def share_group_configs(auto_offset_reset: str, delivery_limit: int) -> GroupConfigs:
    """The share group's configs the worker sets (``input.auto_offset_reset``, delivery limit).

    The broker's delivery limit is one above the worker's: the worker sees the record once more
    and dead-letters it, where the broker would archive it silently.
    """
    return {
        "share.auto.offset.reset": auto_offset_reset,
        "share.delivery.count.limit": str(delivery_limit + 1),
    }


def configure_group(settings: dict[str, str], group: str, configs: GroupConfigs) -> None:
    """Set ``configs`` on share group ``group`` (incremental: other group configs stay).

    Works before the group exists. Needs ALTER_CONFIGS on the group when ACLs are on.

    Raises:
        BrokerError: the broker refused or did not answer.
    """
    from confluent_kafka.admin import (  # type: ignore[attr-defined]
        AdminClient,
        AlterConfigOpType,
        ConfigEntry,
        ConfigResource,
        ResourceType,
    )

    entries = [
        ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET) for k, v in configs.items()
    ]
    resource = ConfigResource(ResourceType.GROUP, group, incremental_configs=entries)
    admin = AdminClient({**settings, "log_level": "0"})
    try:
        for future in admin.incremental_alter_configs([resource]).values():
            future.result(timeout=30)
    except KafkaException as exc:
        raise BrokerError(f"cannot set share group {group!r}'s configs {configs}: {exc}") from exc
    log.info("share group %s: %s", group, configs)


class ShareBacklog:
    """What a share-group worker can see of its group's backlog, per partition (thread-safe).

    The client has no share-group admin calls (the group's start offset is the broker's tool's
    to read, ``ops.sharelag``), so the worker compares what it can read itself: the partition's
    end offset (the admin client's ``list_offsets``, asked at most every ``interval_s``) with
    the offset after the newest record it has been delivered. A share partition hands its
    records out in offset order, so over the group's workers the smallest of these is the
    records no worker has been given yet (``stream_scorer_share_backlog_records``; ``min``
    across workers in PromQL). Records delivered but not yet acknowledged are not counted.
    """

    def __init__(self, admin_settings: Mapping[str, str], interval_s: float = 5.0) -> None:
        """Prepare; the admin client is created on the first ``records``.

        Args:
            admin_settings: librdkafka settings for an admin client (brokers, security).
            interval_s: the least time between two asks for the end offsets.
        """
        self._settings: dict[str, Any] = {**admin_settings, "log_level": "3"}
        self._interval = interval_s
        self._next: dict[TP, int] = {}  # the offset after the newest record delivered
        self._cached: dict[TP, int] = {}
        self._asked = -float("inf")
        self._admin: Any = None
        self._lock = threading.Lock()

    def delivered(self, topic: str, partition: int, offset: int) -> None:
        """A record was delivered to this worker."""
        with self._lock:
            tp = (topic, partition)
            self._next[tp] = max(self._next.get(tp, 0), offset + 1)

    def records(self, timeout_s: float = 5.0) -> dict[TP, int]:
        """The end offset minus the offset after the newest delivered record, per partition.

        Partitions this worker has received nothing from are left out. The end offsets are
        asked again once ``interval_s`` has passed; a failed ask keeps the last values (an
        outage is the loop's to report).
        """
        with self._lock:
            frontier = dict(self._next)
        if frontier and time.monotonic() - self._asked >= self._interval:
            self._asked = time.monotonic()
            ends = self._end_offsets(list(frontier), timeout_s)
            with self._lock:
                self._cached.update(ends)
        return {
            tp: max(0, self._cached[tp] - offset)
            for tp, offset in frontier.items()
            if tp in self._cached
        }

    def _end_offsets(self, tps: list[TP], timeout_s: float) -> dict[TP, int]:
        from confluent_kafka import TopicPartition
        from confluent_kafka.admin import AdminClient, OffsetSpec  # type: ignore[attr-defined]

        if self._admin is None:
            self._admin = AdminClient(self._settings)
        ends: dict[TP, int] = {}
        try:
            latest = OffsetSpec.latest()  # type: ignore[no-untyped-call]
            asks = {TopicPartition(t, p): latest for t, p in tps}
            for tp, future in self._admin.list_offsets(asks, request_timeout=timeout_s).items():
                ends[(tp.topic, tp.partition)] = int(future.result(timeout=timeout_s).offset)
        except Exception as exc:  # never raises: the gauge keeps its last value
            log.debug("share backlog: cannot read the end offsets: %s", exc)
        return ends


class ShareSource(ConsumerErrors):
    """A subscribed share consumer that hands out batches (the ``Source`` of share groups)."""

    def __init__(
        self,
        settings: dict[str, str],
        topic: str,
        *,
        unreachable_timeout_s: float,
        delivery_limit: int,
        extra_topics: Sequence[str] = (),
        admin_settings: Mapping[str, str] | None = None,
    ) -> None:
        """Prepare a share consumer; it is created and subscribed on ``__enter__``.

        ``extra_topics``: more topic names (share consumers take exact names only).
        ``admin_settings``: an admin client's settings, for the backlog's end offsets
        (``ShareBacklog``; default: the brokers of ``settings``).
        """
        self._settings = settings
        self._topic = topic
        self._topics = [topic, *extra_topics]
        self._unreachable_timeout = unreachable_timeout_s
        self._limit = delivery_limit
        self._errors: list[BrokerError] = []
        self._down_since: float | None = None
        self._consumer: Any = None
        self._client_log = client_logger("consumer")
        #: records handed out and not acknowledged yet, by (topic, partition, offset)
        self._unacked: dict[tuple[str, int, int], Message] = {}
        self._seen: set[tuple[str, int]] = set()
        self._broker_seen = False
        self.joined = False  # a poll returned (membership is the broker's business)
        self.rebalances = 0  # share groups have no rebalances the worker takes part in
        self.lag = LagTracker()  # per-partition lag: the ``lag`` command (ShareGroupCommand)
        #: the backlog this worker can see (``stream_scorer_share_backlog_records``)
        self.backlog: ShareBacklog | None = ShareBacklog(
            admin_settings or {"bootstrap.servers": settings.get("bootstrap.servers", "")}
        )
        #: acknowledgements sent: accepted and released records
        self.accepted = 0
        self.released = 0

    # --- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> ShareSource:
        from confluent_kafka import ShareConsumer

        global _warned
        if not _warned:
            log.warning(PREVIEW_WARNING)
            _warned = True
        settings: dict[str, Any] = dict(self._settings)
        settings["error_cb"] = self._on_error
        settings["logger"] = self._client_log
        try:
            self._consumer = ShareConsumer(settings)
            self._consumer.subscribe(self._topics)
        except KafkaException as exc:
            raise BrokerError(
                f"cannot create the share consumer: {exc}", topic=self._topic
            ) from exc
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._consumer is None:
            return
        try:
            self.release_all()
            self._consumer.close()  # commits the acknowledgements and leaves the group
        except (KafkaException, RuntimeError) as err:
            log.warning("share consumer close failed: %s", err)
        self._consumer = None

    # --- callbacks: never raise ------------------------------------------------------------
    # --- the main loop's calls -------------------------------------------------------------
    def poll_batch(self, max_records: int, max_wait_s: float) -> list[Message]:
        """Return the records of one poll (about ``batch.max_records``: a soft bound).

        Returns nothing while records of the previous poll wait for their acknowledgement
        (the client refuses to poll before).

        Raises:
            BrokerError: a non-retriable consume error.
        """
        if self._unacked:
            time.sleep(min(max_wait_s, 0.01))
            return []
        try:
            messages = self._consumer.poll(max_wait_s)
        except KafkaException as exc:
            raise BrokerError(f"share consume failed: {exc}", topic=self._topic) from exc
        self.joined = True
        batch: list[Message] = []
        for msg in messages:
            err = msg.error()
            if err is None:
                batch.append(msg)
                key = (msg.topic() or "", msg.partition() or 0, msg.offset() or 0)
                self._unacked[key] = msg
                if self.backlog is not None:
                    self.backlog.delivered(*key)
                self._seen.add(key[:2])
            elif err.retriable() or (not err.fatal() and err.code() < 0):
                log.warning("share consume: %s", err)
            else:
                raise BrokerError(f"share consume error: {err}", topic=msg.topic())
        if batch:
            self._down_since = None
            self._broker_seen = True
        return batch

    def split(self, batch: Sequence[Message]) -> tuple[list[Message], list[DeadLetter]]:
        """The records to score, and dead letters for those delivered ``delivery_limit`` times."""
        fresh: list[Message] = []
        spent: list[DeadLetter] = []
        for msg in batch:
            count = int(getattr(msg, "delivery_count", lambda: 1)() or 1)
            if count >= self._limit:
                spent.append(
                    DeadLetter(
                        msg,
                        Reason.DELIVERY_LIMIT.stage,
                        Reason.DELIVERY_LIMIT,
                        "stream_scorer",
                        f"delivered {count} times without an acknowledgement "
                        f"(input.delivery_limit = {self._limit}): its workers died or failed on it",
                    )
                )
            else:
                fresh.append(msg)
        return fresh, spent

    def store(self, offsets: list[Position]) -> None:
        """ACCEPT the held records of each partition whose outputs were all delivered.

        ``offsets`` names the partitions whose watermark moved: every record of theirs held
        now is from the one batch in flight (the delivery waits for each batch), so all are
        done; offsets themselves do not order a share group's records.
        """
        from confluent_kafka import AcknowledgeType

        done = {(t, p) for t, p, _o in offsets}
        if not done or not self._unacked:
            return
        for key in [k for k in self._unacked if k[:2] in done]:
            self._ack(key, AcknowledgeType.ACCEPT)
            self.accepted += 1
        self._send()

    def release_all(self) -> None:
        """RELEASE every held record (a stop before their outputs were delivered)."""
        from confluent_kafka import AcknowledgeType

        if not self._unacked:
            return
        count = len(self._unacked)
        for key in list(self._unacked):
            self._ack(key, AcknowledgeType.RELEASE)
        self.released += count
        log.warning("released %d records not delivered, for redelivery", count)
        self._send()

    def _ack(self, key: tuple[str, int, int], kind: Any) -> None:
        msg = self._unacked.pop(key)
        try:
            self._consumer.acknowledge(msg, kind)
        except KafkaException as exc:
            log.warning("acknowledge %s/%d@%d: %s", *key, exc)

    def _send(self) -> None:
        try:
            self._consumer.commit_async()
        except KafkaException as exc:
            log.warning("sending acknowledgements failed (records will be redelivered): %s", exc)

    def commit(self, offsets: list[Position] | None = None) -> None:
        """Send the acknowledgements made so far and wait for the broker's answer."""
        try:
            for tp, err in (self._consumer.commit_sync() or {}).items():
                if err is not None:
                    log.warning("acknowledgement of %s failed (redelivered): %s", tp, err)
        except KafkaException as exc:
            log.warning("acknowledgement commit failed (records will be redelivered): %s", exc)

    def mark_committed(self, offsets: list[Position]) -> None:
        """Nothing to do: share groups have no transactions."""

    def pause(self) -> None:
        """Nothing to do: the delivery waits for each batch before the next poll."""

    def resume(self) -> None:
        """Nothing to do (``pause``)."""

    def group_metadata(self) -> Any:
        """Share groups have no transactions (``config check`` refuses exactly-once)."""
        raise BrokerError("share groups are at-least-once only")

    def rewind(self, timeout_s: float = 30.0) -> None:
        """Nothing to do: records not acknowledged come back by themselves."""

    def fetched_to_end(self, timeout_s: float = 10.0) -> bool:
        """True: an empty poll is all a share consumer can tell (the idle clock does the rest)."""
        return True

    @property
    def group_settled(self) -> bool:
        """Always: members come and go without a rebalance the worker takes part in."""
        return True

    @property
    def broker_reachable(self) -> bool:
        """A broker has answered since start and not every broker is down now."""
        return (self._broker_seen or self.joined) and self._down_since is None

    @property
    def assignment(self) -> set[tuple[str, int]]:
        """The partitions records came from so far (a share group assigns none for good)."""
        return set(self._seen)
