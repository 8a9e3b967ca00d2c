"""Sink: publish predictions and dead letters, and learn from delivery reports what is done.

A batch is done only when the broker acknowledged every one of its outputs; the delivery
callbacks count them down and then tell the ``OffsetTracker``. Callbacks never raise: a
failed delivery is recorded and ``raise_errors`` raises it in the main loop.

Dead letters keep the original key, value and headers, and add Kafka Connect's
``__connect.errors.*`` context headers plus ``stream_scorer.*`` extras (see
docs/manual/dead-letters.md). One that would not fit the dead-letter topic (``SinkContext.
dead_letter_max_bytes``) is written stripped of its key and value (``letters.strip``), so no
record can stop a partition.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, Protocol

from confluent_kafka import KafkaError, KafkaException

from stream_scorer import headers as hdr
from stream_scorer.clients import QUEUE_FULL_TIMEOUT_S, produce_retrying
from stream_scorer.envelope import Protector
from stream_scorer.errors import BrokerError, DeliveryError
from stream_scorer.kafka.access import Grant, denied
from stream_scorer.letters import Signer, fits, framed_size, strip
from stream_scorer.stages.multi import ModelOutput, MultiResult, as_multi
from stream_scorer.stages.pipeline import BatchResult
from stream_scorer.stages.records import DeadLetter, Message, Scored
from stream_scorer.worker.metrics import Metrics
from stream_scorer.worker.offsets import OffsetTracker, Span, Ticket

log = logging.getLogger(__name__)


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
    queue_full_timeout_s: float = QUEUE_FULL_TIMEOUT_S
    #: Input headers copied onto each prediction (``output.copy_headers``).
    copy_headers: frozenset[str] = frozenset()
    #: ``User:<name>`` the producer authenticates as (empty: none), named when refused.
    principal: str = ""
    #: What dead letters carry of their records (``dead_letter.payload``); None: everything.
    protector: Protector | None = None
    #: The bytes a dead letter must fit: the least of the dead-letter topic's
    #: ``max.message.bytes`` and the producer's ``message.max.bytes`` (0: no limit known).
    dead_letter_max_bytes: int = 0
    #: Signs every dead letter (``dead_letter.signing_key``); None: unsigned.
    signer: Signer | None = None


def dead_letter_headers(
    dl: DeadLetter, ctx: SinkContext, model_version: str = "", model_name: str = ""
) -> list[tuple[str, bytes | None]]:
    """Return the original headers followed by the error context headers.

    ``model_version``: the model the record's batch was scored with (default: ``ctx``'s);
    ``model_name``: the ``models:`` entry that refused it (none: no header).
    """
    original, context = _header_parts(dl, ctx, model_version, model_name)
    return original + context


def _header_parts(
    dl: DeadLetter, ctx: SinkContext, model_version: str = "", model_name: str = ""
) -> tuple[list[tuple[str, bytes | None]], list[tuple[str, bytes | None]]]:
    """The record's own headers (its attempt header left out) and the error context headers."""
    msg = dl.message
    ts_type, ts = msg.timestamp()
    original = list(msg.headers() or ())
    attempt = next((v for k, v in original if k == hdr.ATTEMPT and v), b"1")
    added = {
        hdr.CONNECT_TOPIC: msg.topic() or "",
        hdr.CONNECT_PARTITION: str(msg.partition()),
        hdr.CONNECT_OFFSET: str(msg.offset()),
        hdr.CONNECT_STAGE: dl.stage.value,
        hdr.CONNECT_CLASS_NAME: "stream_scorer",
        hdr.CONNECT_EXCEPTION_CLASS: dl.error_type,
        hdr.CONNECT_EXCEPTION_MESSAGE: (
            f"withheld (dead_letter.payload = {ctx.protector.mode})"
            if ctx.protector is not None and ctx.protector.withholds_details
            else dl.error_message[:2000]
        ),
        hdr.REASON: dl.reason,
        hdr.ORIGINAL_TIMESTAMP: str(ts),
        hdr.ORIGINAL_TIMESTAMP_TYPE: str(ts_type),
        hdr.CONSUMER_GROUP: ctx.group_id,
        hdr.WORKER_ID: ctx.worker_id,
        hdr.MODEL_VERSION: model_version or ctx.model_version,
        hdr.ATTEMPT: attempt.decode(errors="replace"),
    }
    if model_name:
        added[hdr.MODEL_NAME] = model_name
    own: list[tuple[str, bytes | None]] = [(k, v) for k, v in original if k != hdr.ATTEMPT]
    return own, [(k, v.encode()) for k, v in added.items()]


def dead_letter(
    dl: DeadLetter, ctx: SinkContext, model_version: str = "", model_name: str = ""
) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]], bool]:
    """The dead letter of ``dl`` as written: key, value, headers, and whether it was stripped.

    Protected as ``ctx.protector`` says, stripped when the whole letter would not fit
    ``ctx.dead_letter_max_bytes``, signed last when ``ctx.signer`` is set. ``model_name``: the
    ``models:`` entry that refused the record (``headers.MODEL_NAME``; none: no header).
    """
    msg = dl.message
    original, context = _header_parts(dl, ctx, model_version, model_name)
    key, value = msg.key(), msg.value()
    extra: list[tuple[str, bytes | None]] = []
    if ctx.protector is not None:
        coordinates = (msg.topic() or "", msg.partition() or 0, msg.offset() or 0)
        key, value, extra = ctx.protector.protect(key, value, *coordinates)
    headers = original + context + extra
    reserve = 0 if ctx.signer is None else ctx.signer.header_bytes
    limit = ctx.dead_letter_max_bytes - reserve if ctx.dead_letter_max_bytes else 0
    stripped = not fits(key, value, headers, limit)
    if stripped:
        dropped = ctx.protector is not None and ctx.protector.mode == "drop"
        key, value = None, None
        headers = strip(
            None if dropped else msg.value(), original, context, ctx.dead_letter_max_bytes, reserve
        )
    if ctx.signer is not None:
        headers = ctx.signer.sign(key, value, headers)
    if not fits(key, value, headers, ctx.dead_letter_max_bytes):
        # even stripped, the coordinates and context do not fit: a topic whose limit is too
        # small for any dead letter; stop before producing (nothing is committed past it)
        raise BrokerError(
            f"cannot produce to {ctx.dead_letter_topic!r}: MSG_SIZE_TOO_LARGE: even without its "
            f"key and value, the dead letter ({framed_size(key, value, headers)} bytes) exceeds "
            f"the {ctx.dead_letter_max_bytes} bytes the dead-letter topic takes; raise its "
            "max.message.bytes",
            topic=msg.topic(),
            partition=msg.partition(),
            offset=msg.offset(),
        )
    return key, value, headers, stripped


def _refused(msg: Message, topic: str, exc: Exception, principal: str = "") -> BrokerError:
    """The error for an output ``produce()`` refused, naming the input record.

    An authorization refusal (the client learnt from the broker that this principal may not
    write ``topic``) is the ``AccessDeniedError`` naming the grant, as a refused delivery is.
    """
    err = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
    if isinstance(err, KafkaError):
        refused = denied(err, Grant("topic", topic, "write"), principal)
        if refused is not None:
            return refused
    return BrokerError(
        f"cannot produce to {topic}: {exc}",
        topic=msg.topic() or "",
        partition=msg.partition(),
        offset=msg.offset(),
    )


class _Outputs:
    """The outputs of one batch's records of one partition, awaiting acknowledgement.

    Every model's prediction and every dead letter of these records counts (``expect``); the
    span is acknowledged to the tracker when the broker acknowledged all of them and the batch
    is fully produced (``produced``: until then one count is held back, so acknowledgements
    served while the batch is still being produced cannot release the span early). The bound
    methods are the delivery callbacks of these outputs (one object per batch and partition,
    not one closure per record). They never raise.
    """

    __slots__ = ("left", "scored", "sink", "span")

    def __init__(self, sink: Sink, span: Span | None) -> None:
        self.sink = sink
        self.span = span
        self.scored: list[Scored] = []
        self.left = 1  # held back until ``produced``

    def produced(self) -> None:
        """Every output of these records was produced: release the count held back."""
        self._one_done()

    def _one_done(self) -> None:
        self.left -= 1
        if self.left == 0 and self.span is not None:
            self.sink.tracker.ack(self.span)

    def _input_of(self, msg: Any) -> Message | None:
        """The input record of a refused prediction (error path only: a linear search)."""
        for scored in self.scored:
            try:
                return scored.messages[scored.encoded.index(msg.value())]
            except Exception:
                continue
        return None

    def prediction(self, err: Any, msg: Any) -> None:
        try:
            if err is not None:
                self.sink.failed("prediction", err, self._input_of(msg), msg.topic())
                return
            self.sink.acked_predictions += 1  # added to the counter once per poll
            self._one_done()
        except Exception:  # pragma: no cover - defensive: a callback must not raise
            self.sink.failed("prediction", traceback.format_exc(), None, None)

    def model_prediction(self, name: str, err: Any, msg: Any) -> None:
        """A named model's prediction (``models:``): also counted per model."""
        try:
            if err is None:
                acked = self.sink.acked_by_model
                acked[name] = acked.get(name, 0) + 1
        except Exception:  # pragma: no cover - defensive: a callback must not raise
            pass
        self.prediction(err, msg)

    def dead_letter(self, dl: DeadLetter, stripped: bool, err: Any, msg: Any) -> None:
        try:
            if err is not None:
                self.sink.failed("dead letter", err, dl.message, msg.topic())
                return
            self.sink.metrics.dead_letters.labels(dl.stage.value, dl.reason).inc()
            if stripped:
                self.sink.metrics.dead_letters_stripped.labels(dl.stage.value, dl.reason).inc()
            self._one_done()
        except Exception:  # pragma: no cover - defensive: a callback must not raise
            self.sink.failed("dead letter", traceback.format_exc(), dl.message, None)


class Sink:
    """Publishes a batch's outputs and tracks their acknowledgement."""

    def __init__(
        self, producer: Producer, ctx: SinkContext, tracker: OffsetTracker, metrics: Metrics
    ) -> None:
        """Create a sink writing through ``producer``."""
        self._producer = producer
        self._ctx = ctx
        self.tracker = tracker
        self.metrics = metrics
        self._errors: list[BrokerError] = []
        self.acked_predictions = 0
        #: model name -> predictions acknowledged since the last poll (``models:`` only)
        self.acked_by_model: dict[str, int] = {}
        #: (topic, partition) -> the model-version, source-topic and source-partition headers
        self._source_headers: dict[tuple[str, str, int], list[tuple[str, bytes | None]]] = {}

    def failed(self, what: str, err: Any, source: Message | None, to: str | None) -> None:
        """Record that the broker refused the output of ``source`` (from delivery callbacks).

        Args:
            what: ``prediction`` or ``dead letter``.
            err: the delivery report's error.
            source: the input record (its topic, partition and offset end the message).
            to: the topic that refused the output (the output or dead-letter topic).
        """
        self.metrics.delivery_errors.inc()
        where = "" if to is None else f" to topic {to!r}"
        refused = None
        if isinstance(err, KafkaError) and to is not None:
            refused = denied(err, Grant("topic", to, "write"), self._ctx.principal)
        if refused is not None:
            self._errors.append(refused)
            return
        self._errors.append(
            DeliveryError(
                f"broker did not acknowledge the {what}{where} for this record: {err}",
                topic=None if source is None else source.topic(),
                partition=None if source is None else source.partition(),
                offset=None if source is None else source.offset(),
            )
        )

    # --- publishing ------------------------------------------------------------------------
    def _produce_waiting(
        self,
        msg: Message,
        topic: str,
        value: bytes | None,
        headers: list[tuple[str, bytes | None]],
        callback: Callable[[Any, Any], None],
        key: bytes | Literal[False] | None = False,
    ) -> None:
        """Produce, serving delivery reports while the local queue is full.

        ``key``: the record's key; ``False`` (the default): ``msg``'s.
        """
        record_key = msg.key() if key is False else key
        try:
            produce_retrying(
                self._producer,
                topic,
                value,
                timeout_s=self._ctx.queue_full_timeout_s,
                key=record_key,
                headers=headers,
                on_delivery=callback,
            )
        except BrokerError:
            raise
        except Exception as exc:
            raise _refused(msg, topic, exc, self._ctx.principal) from exc

    def _headers_of(self, tp: tuple[str, int], version: str) -> list[tuple[str, bytes | None]]:
        """The headers every prediction of ``version`` for records of ``tp`` starts with."""
        common = self._source_headers.get((version, *tp))
        if common is None:
            if len(self._source_headers) > 4096:  # versions swapped in over a long life
                self._source_headers.clear()
            common = self._source_headers[(version, *tp)] = [
                (hdr.MODEL_VERSION, version.encode()),
                (hdr.SOURCE_TOPIC, tp[0].encode()),
                (hdr.SOURCE_PARTITION, str(tp[1]).encode()),
            ]
        return common

    def publish(
        self,
        scored: Scored,
        dead: Sequence[DeadLetter],
        ticket: Ticket | None = None,
        model_version: str = "",
    ) -> None:
        """Produce every prediction and dead letter of a batch (asynchronously).

        Each span of ``ticket`` (``OffsetTracker.track``) is acknowledged once the broker
        acknowledged the outputs of all its records; None: nothing is tracked.
        ``model_version``: the model that scored the batch, in every output's headers
        (default: the context's).
        """
        result = BatchResult(scored, list(dead), model_version=model_version)
        self.publish_batch(as_multi(result, self._ctx.output_topic), ticket)

    def publish_batch(self, batch: MultiResult, ticket: Ticket | None = None) -> None:
        """Produce every model's predictions and every dead letter of a batch (asynchronously).

        Each model's predictions go to its topic, stamped with its version; a dead letter of a
        model names it (``headers.MODEL_NAME``). Each span of ``ticket`` is acknowledged once
        the broker acknowledged every output of all its records; None: nothing is tracked.
        """
        ctx = self._ctx
        spans = {} if ticket is None else ticket.spans
        groups: dict[tuple[str, int], _Outputs] = {}

        def group(msg: Message) -> _Outputs:
            tp = (msg.topic() or "", msg.partition() or 0)
            found = groups.get(tp)
            if found is None:
                found = groups[tp] = _Outputs(self, spans.get(tp))
            return found

        main = next((o for o in batch.outputs if not o.shadow), None)
        default = (main.result.model_version if main else "") or ctx.model_version
        for out in batch.outputs:
            self._predictions(out, group)
        for out in batch.outputs:
            version = out.result.model_version or ctx.model_version
            for dl in out.result.dead:
                self._dead_letter(dl, version, out.name, group(dl.message))
        for dl in batch.dead:
            self._dead_letter(dl, default, "", group(dl.message))
        for outputs in groups.values():
            outputs.produced()
        self.poll(0)

    def _predictions(self, out: ModelOutput, group: Callable[[Message], _Outputs]) -> None:
        """Produce one model's predictions of the batch to its topic."""
        ctx, scored = self._ctx, out.result.scored
        version = out.result.model_version or ctx.model_version
        produce, topic = self._producer.produce, out.topic or ctx.output_topic
        copied = ctx.copy_headers if out.copy_headers is None else out.copy_headers
        offset_header = hdr.SOURCE_OFFSET  # a local: looked up once per batch, not per record
        last: tuple[str, int] | None = None
        versions = scored.versions  # a routed batch (a rollout): the version of each row
        for i, (msg, value) in enumerate(zip(scored.messages, scored.encoded, strict=True)):
            tp = (msg.topic() or "", msg.partition() or 0)
            if tp != last:  # consumed records come in runs per partition
                last = tp
                outputs = group(msg)
                if not outputs.scored or outputs.scored[-1] is not scored:
                    outputs.scored.append(scored)
                common = self._headers_of(tp, version)
                done = (
                    partial(outputs.model_prediction, out.name) if out.name else outputs.prediction
                )
            if versions is not None:  # a rollout's row: stamped with the version that scored it
                common = self._headers_of(tp, versions[i])
            outputs.left += 1
            headers = [*common, (offset_header, b"%d" % (msg.offset() or 0))]
            if copied:
                headers.extend((k, v) for k, v in msg.headers() or () if k in copied)
            try:
                produce(topic, value, msg.key(), on_delivery=done, headers=headers)
            except BufferError:  # the local queue is full: wait for room
                self._produce_waiting(msg, topic, value, headers, done)
            except Exception as exc:
                outputs.left -= 1
                raise _refused(msg, topic, exc, ctx.principal) from exc

    def _dead_letter(self, dl: DeadLetter, version: str, name: str, outputs: _Outputs) -> None:
        """Produce the dead letter of ``dl`` (``name``: the model that refused it, if one)."""
        ctx = self._ctx
        dl_key, dl_value, dl_headers, stripped = dead_letter(
            dl, ctx, dl.model_version or version, name
        )
        if stripped:
            m = dl.message
            log.warning(
                "dead letter of %s[%s]@%s (%s) is larger than the %d bytes the dead-letter "
                "topic takes: written without its key and value (size and SHA-256 kept)",
                m.topic(),
                m.partition(),
                m.offset(),
                dl.reason,
                ctx.dead_letter_max_bytes,
            )
        outputs.left += 1
        try:
            self._produce_waiting(
                dl.message,
                ctx.dead_letter_topic,
                dl_value,
                dl_headers,
                partial(outputs.dead_letter, dl, stripped),
                dl_key,
            )
        except BaseException:
            outputs.left -= 1
            raise

    def _count_acks(self) -> None:
        if self.acked_predictions:
            self.metrics.predictions.inc(self.acked_predictions)
            self.acked_predictions = 0
        if self.acked_by_model:
            for name, count in self.acked_by_model.items():
                self.metrics.model_predictions.labels(name).inc(count)
            self.acked_by_model = {}

    def poll(self, timeout: float = 0.0) -> None:
        """Serve delivery reports."""
        self._producer.poll(timeout)
        self._count_acks()

    def flush(self, timeout: float) -> int:
        """Wait up to ``timeout`` s for every outstanding delivery; return how many remain."""
        remaining = self._producer.flush(timeout)
        self._count_acks()
        return remaining

    @property
    def errors(self) -> list[BrokerError]:
        """The delivery failures recorded and not raised or cleared yet."""
        return list(self._errors)

    def clear_errors(self) -> list[BrokerError]:
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
