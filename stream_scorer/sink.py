"""Sink: publish predictions and dead letters, and learn from delivery reports what is done.

A record is done only when the broker acknowledges its output; the delivery callback then
tells the ``OffsetTracker``. Callbacks never raise: a failed delivery is recorded and
``raise_errors`` raises it in the main loop.

Dead letters keep the original key, value and headers, and add Kafka Connect's
``__connect.errors.*`` context headers plus ``stream_scorer.*`` extras (see README.md,
"Dead letters").
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from stream_scorer.encode import (
    HEADER_MODEL_VERSION,
    HEADER_SOURCE_OFFSET,
    HEADER_SOURCE_PARTITION,
    HEADER_SOURCE_TOPIC,
)
from stream_scorer.errors import BrokerError, DeliveryError
from stream_scorer.metrics import Metrics
from stream_scorer.offsets import OffsetTracker
from stream_scorer.records import DeadLetter, Message, Scored

DLQ_PREFIX = "__connect.errors."
EXTRA_PREFIX = "stream_scorer."
REASON_HEADER = "stream_scorer.error.reason"
#: How many times the record has been through the worker: 1, or one more than the attempt
#: header a replay (``stream-scorer dlq replay``) put on it.
ATTEMPT_HEADER = "stream_scorer.attempt"


class Producer(Protocol):
    """The parts of confluent-kafka's ``Producer`` the sink uses."""

    def produce(  # noqa: D102
        self,
        topic: str,
        value: bytes | None = ...,
        key: bytes | None = ...,
        *,
        on_delivery: Callable[[Any, Any], None] | None = ...,
        headers: Any = ...,
    ) -> None: ...
    def poll(self, timeout: float = ...) -> int: ...  # noqa: D102
    def flush(self, timeout: float = ...) -> int: ...  # noqa: D102


@dataclass(frozen=True)
class SinkContext:
    """Who is publishing: goes into dead-letter and prediction headers."""

    output_topic: str
    dead_letter_topic: str
    group_id: str
    worker_id: str
    model_version: str
    queue_full_timeout_s: float = 120.0


def dead_letter_headers(dl: DeadLetter, ctx: SinkContext) -> list[tuple[str, bytes | None]]:
    """Return the original headers followed by the error context headers."""
    msg = dl.message
    ts_type, ts = msg.timestamp()
    context = {
        "topic": msg.topic() or "",
        "partition": str(msg.partition()),
        "offset": str(msg.offset()),
        "stage": dl.stage.value,
        "class.name": "stream_scorer",
        "exception.class.name": dl.error_type,
        "exception.message": dl.error_message[:2000],
    }
    original = list(msg.headers() or ())
    attempt = next((v for k, v in original if k == ATTEMPT_HEADER and v), b"1")
    extras = {
        REASON_HEADER: dl.reason,
        "stream_scorer.original.timestamp": str(ts),
        "stream_scorer.original.timestamp.type": str(ts_type),
        "stream_scorer.consumer.group": ctx.group_id,
        "stream_scorer.worker.id": ctx.worker_id,
        "stream_scorer.model.version": ctx.model_version,
        ATTEMPT_HEADER: attempt.decode(errors="replace"),
    }
    headers: list[tuple[str, bytes | None]] = [(k, v) for k, v in original if k != ATTEMPT_HEADER]
    headers.extend((DLQ_PREFIX + k, v.encode()) for k, v in context.items())
    headers.extend((k, v.encode()) for k, v in extras.items())
    return headers


class Sink:
    """Publishes a batch's outputs and tracks their acknowledgement."""

    def __init__(
        self, producer: Producer, ctx: SinkContext, tracker: OffsetTracker, metrics: Metrics
    ) -> None:
        """Create a sink writing through ``producer``."""
        self._producer = producer
        self._ctx = ctx
        self._tracker = tracker
        self._metrics = metrics
        self._errors: list[DeliveryError] = []
        self._version_header = ctx.model_version.encode()
        self._acked_predictions = 0
        #: (topic, partition) -> the model-version, source-topic and source-partition headers
        self._source_headers: dict[tuple[str, int], list[tuple[str, bytes | None]]] = {}

    # --- delivery callbacks: never raise -------------------------------------------------
    def _delivered(
        self,
        topic: str,
        partition: int,
        offset: int,
        reason: tuple[str, str] | None,
        err: Any,
        _msg: Any,
    ) -> None:
        try:
            if err is not None:
                self._metrics.delivery_errors.inc()
                what = "dead letter" if reason else "prediction"
                self._errors.append(
                    DeliveryError(
                        f"broker did not acknowledge the {what} for this record: {err}",
                        topic=topic,
                        partition=partition,
                        offset=offset,
                    )
                )
                return
            self._tracker.ack(topic, partition, offset)
            if reason is None:
                self._acked_predictions += 1  # added to the counter once per poll
            else:
                self._metrics.dead_letters.labels(*reason).inc()
        except Exception as exc:  # pragma: no cover - defensive: a callback must not raise
            self._errors.append(
                DeliveryError(f"delivery callback failed: {traceback.format_exc()}")
            )
            del exc

    # --- publishing ------------------------------------------------------------------------
    def _produce(
        self,
        msg: Message,
        topic: str,
        value: bytes | None,
        headers: list[tuple[str, bytes | None]],
        reason: tuple[str, str] | None,
    ) -> None:
        src_topic, src_part, src_off = msg.topic() or "", msg.partition() or 0, msg.offset() or 0
        callback = partial(self._delivered, src_topic, src_part, src_off, reason)
        deadline: float | None = None
        while True:
            try:
                self._producer.produce(
                    topic, value=value, key=msg.key(), headers=headers, on_delivery=callback
                )
                return
            except BufferError:
                # the local queue is full: serve delivery reports until there is room
                now = time.monotonic()
                deadline = deadline or now + self._ctx.queue_full_timeout_s
                if now > deadline:
                    raise BrokerError(
                        f"producer queue stayed full for {self._ctx.queue_full_timeout_s:.0f} s",
                        topic=topic,
                    ) from None
                self._producer.poll(0.05)
            except Exception as exc:
                raise BrokerError(
                    f"cannot produce to {topic}: {exc}",
                    topic=src_topic,
                    partition=src_part,
                    offset=src_off,
                ) from exc

    def publish(self, scored: Sequence[Scored], dead: Sequence[DeadLetter]) -> None:
        """Produce every prediction and dead letter (asynchronously)."""
        ctx = self._ctx
        cached = self._source_headers
        for item in scored:
            msg = item.message
            tp = (msg.topic() or "", msg.partition() or 0)
            common = cached.get(tp)
            if common is None:
                common = cached[tp] = [
                    (HEADER_MODEL_VERSION, self._version_header),
                    (HEADER_SOURCE_TOPIC, tp[0].encode()),
                    (HEADER_SOURCE_PARTITION, str(tp[1]).encode()),
                ]
            headers = [*common, (HEADER_SOURCE_OFFSET, str(msg.offset()).encode())]
            self._produce(msg, ctx.output_topic, item.value, headers, None)
        for dl in dead:
            self._produce(
                dl.message,
                ctx.dead_letter_topic,
                dl.message.value(),
                dead_letter_headers(dl, ctx),
                (dl.stage.value, dl.reason),
            )
        self.poll(0)

    def _count_acks(self) -> None:
        if self._acked_predictions:
            self._metrics.predictions.inc(self._acked_predictions)
            self._acked_predictions = 0

    def poll(self, timeout: float = 0.0) -> None:
        """Serve delivery reports."""
        self._producer.poll(timeout)
        self._count_acks()

    def flush(self, timeout: float) -> int:
        """Wait up to ``timeout`` s for every outstanding delivery; return how many remain."""
        remaining = self._producer.flush(timeout)
        self._count_acks()
        return remaining

    def clear_errors(self) -> list[DeliveryError]:
        """Forget recorded delivery failures (an aborted transaction's purged outputs)."""
        errors, self._errors = self._errors, []
        return errors

    def raise_errors(self) -> None:
        """Raise the first recorded delivery failure, if any."""
        if self._errors:
            first = self._errors[0]
            if len(self._errors) > 1:
                first.add_note(f"{len(self._errors) - 1} more deliveries failed")
            raise first
