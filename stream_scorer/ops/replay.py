"""``stream-scorer dlq replay``: publish dead letters again, once.

Reads the dead-letter topic from where the replay's own consumer group left off up to the end
offsets seen at start, keeps the dead letters that match the filter (reasons, a time range of
the dead letter's timestamp), and publishes each with its original key, value and headers (the
error context headers dropped; ``stream_scorer.replay.source`` and ``stream_scorer.attempt``
added) to the target topic, at a bounded rate.

Safe to run twice: every batch of replayed records and the dead-letter offsets it consumed
commit in one Kafka transaction, under a consumer group derived from the target and the filter.
A second run of the same command finds nothing left; a crash mid-way resumes without repeats.

Refused letters: a dead letter that cannot be replayed as the record it names is not
published and is reported (``ReplayReport.refused``: where it is and why), and the replay goes
on with the others (the command then exits 1): a letter stripped of its payload for size
(``stream_scorer.payload: stripped``); an encrypted letter whose envelope does not open for its
coordinates (moved from another dead letter, or damaged); with a signing key
(``--signing-key``, ``dead_letter.signing_key``), a letter that is not signed with it or was
changed since. It stays on the dead-letter topic; the replay's group moves past it. Letters
that only another key opens, or a payload dropped by configuration, stop the replay instead
(``ConfigError``: the command is to be run differently). A v1 envelope (not bound to its
record) still opens, with a warning.

Record size: dead letters of ``too_large`` inputs are larger than librdkafka's default
``message.max.bytes`` (1,000,000), which the client enforces before the broker sees a record.
The replay's producer is sized from the records it reads (re-created, between transactions,
when a larger one comes), unless the configuration sets ``message.max.bytes`` itself. The
target topic's ``max.message.bytes`` on the broker still applies: a record it refuses fails the
replay with an error naming that limit (or the client's, when that is the one that refused).
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from cryptography.hazmat.primitives.asymmetric import rsa

from stream_scorer import headers as hdr
from stream_scorer.clients import produce_retrying
from stream_scorer.config import CLIENT_MESSAGE_MAX_BYTES, RECORD_OVERHEAD_BYTES
from stream_scorer.envelope import (
    DROPPED,
    STRIPPED,
    EnvelopeError,
    EnvelopeKeyError,
    load_private_key,
    open_sealed,
)
from stream_scorer.errors import BrokerError, ConfigError
from stream_scorer.kafka.access import REPLAY_PREFIX
from stream_scorer.letters import SignatureError, Signer, record_size

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplayFilter:
    """Which dead letters to replay.

    Attributes:
        reasons: reason codes to replay (empty: all).
        since_ms: only dead letters written at or after this time (ms since the epoch).
        until_ms: only dead letters written before this time.
    """

    reasons: frozenset[str] = frozenset()
    since_ms: int | None = None
    until_ms: int | None = None

    def matches(self, headers: Mapping[str, bytes], timestamp_ms: int) -> bool:
        """Whether a dead letter with these headers and timestamp is to be replayed."""
        if self.reasons and headers.get(hdr.REASON, b"").decode() not in self.reasons:
            return False
        if self.since_ms is not None and timestamp_ms < self.since_ms:
            return False
        return self.until_ms is None or timestamp_ms < self.until_ms


@dataclass
class ReplayReport:
    """What a replay did."""

    group: str
    scanned: int = 0
    replayed: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    #: ``topic/partition/offset`` of each dead letter not replayed, and why.
    refused: dict[str, str] = field(default_factory=dict)


class _Refused(Exception):
    """A dead letter that cannot be replayed as the record it names (skipped and reported)."""


def replay_headers(
    headers: Sequence[tuple[str, bytes | None]], source: str
) -> list[tuple[str, bytes | None]]:
    """The original headers without the error context, plus the replay's own."""
    kept = [
        (k, v)
        for k, v in headers
        if (not k.startswith(hdr.CONNECT_PREFIX) and not k.startswith(hdr.OWN_PREFIX))
        or k == hdr.ATTEMPT
    ]
    attempt = 1
    for k, v in kept:
        if k == hdr.ATTEMPT and v:
            attempt = int(v.decode() or 1)
    out = [(k, v) for k, v in kept if k != hdr.ATTEMPT]
    out.append((hdr.ATTEMPT, str(attempt + 1).encode()))
    out.append((hdr.REPLAY_SOURCE, source.encode()))
    return out


def default_group(dead_letter_topic: str, target: str, flt: ReplayFilter) -> str:
    """The replay's consumer group: one per (dead-letter topic, target, filter)."""
    key = f"{dead_letter_topic}|{target}|{sorted(flt.reasons)}|{flt.since_ms}|{flt.until_ms}"
    return f"{REPLAY_PREFIX}{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def replay(
    bootstrap: str,
    dead_letter_topic: str,
    target: str,
    flt: ReplayFilter,
    *,
    rate: float | None = None,
    group: str | None = None,
    client: Mapping[str, str] | None = None,
    batch: int = 500,
    timeout_s: float = 60.0,
    private_key: Path | None = None,
    signing_key: Path | None = None,
) -> ReplayReport:
    """Replay matching dead letters of ``dead_letter_topic`` to ``target``; see the module doc.

    Encrypted dead letters (``dead_letter.payload = encrypt``) are decrypted with
    ``private_key`` and replayed with their original key and value. With ``signing_key``
    (the workers' ``dead_letter.signing_key``) only letters signed with it are replayed.
    Letters that cannot be replayed are skipped and listed in ``ReplayReport.refused``.

    Raises:
        ConfigError: a bad rate or batch; an encrypted dead letter without ``private_key``
            (or one it does not open); a dead letter whose payload was dropped.
        BrokerError: the broker refused or did not answer; a record larger than the client's
            ``message.max.bytes`` (set in ``client``) or the target topic's
            ``max.message.bytes`` (the message names which).
    """
    if rate is not None and rate <= 0:
        raise ConfigError("--rate", "must be greater than 0")
    group = group or default_group(dead_letter_topic, target, flt)
    report = ReplayReport(group)
    opener = None if private_key is None else load_private_key(private_key)
    signer = None if signing_key is None else Signer.from_file(signing_key, "--signing-key")
    common = {"bootstrap.servers": bootstrap, **(client or {})}
    consumer = Consumer(
        {
            **common,
            "group.id": group,
            "enable.auto.commit": "false",
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "enable.partition.eof": "true",
        }
    )
    transactional = {"transactional.id": f"{group}-{uuid.uuid4().hex[:8]}", "linger.ms": "5"}
    try:
        publisher = _Publisher(common, transactional, target, timeout_s, opener, signer)
        ends = _assign_from_committed(consumer, dead_letter_topic, timeout_s)
        started = time.monotonic()
        done = {p for p, (position, end) in ends.items() if position >= end}
        while len(done) < len(ends):
            msgs = consumer.consume(batch, 1.0)
            chosen: list[Any] = []
            last: dict[int, int] = {}
            for msg in msgs:
                err = msg.error()
                part, offset = msg.partition() or 0, msg.offset() or 0
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        done.add(part)
                        continue
                    raise BrokerError(f"reading {dead_letter_topic}: {err}")
                end = ends[part][1]
                if offset >= end:
                    done.add(part)
                    continue
                last[part] = offset
                report.scanned += 1
                headers = _headers(msg)
                if flt.matches(headers, msg.timestamp()[1]):
                    chosen.append(msg)
                if offset + 1 >= end:
                    done.add(part)
            if last:
                refused = publisher.publish(consumer, chosen, last, dead_letter_topic)
                for msg in chosen:
                    source = f"{msg.topic()}/{msg.partition()}/{msg.offset()}"
                    if source in refused:
                        log.error("dead letter %s not replayed: %s", source, refused[source])
                        continue
                    reason = _headers(msg).get(hdr.REASON, b"?").decode(errors="replace")
                    report.by_reason[reason] = report.by_reason.get(reason, 0) + 1
                    report.replayed += 1
                report.refused.update(refused)
            if rate:
                ahead = report.replayed / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)  # the rate limit
    except KafkaException as exc:
        raise BrokerError(f"replay failed: {exc}", topic=dead_letter_topic) from exc
    finally:
        consumer.close()
    return report


def _headers(msg: Any) -> dict[str, bytes]:
    return {str(k): bytes(v or b"") for k, v in msg.headers() or []}


def _assign_from_committed(
    consumer: Any, topic: str, timeout_s: float
) -> dict[int, tuple[int, int]]:
    """Assign every partition at the group's committed offset; return (start, end) each."""
    meta = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
    if meta is None or meta.error is not None:
        raise BrokerError(f"no such dead-letter topic: {topic}", topic=topic)
    tps = [TopicPartition(topic, p) for p in sorted(meta.partitions)]
    committed = consumer.committed(tps, timeout=timeout_s)
    ranges: dict[int, tuple[int, int]] = {}
    assign = []
    for tp in committed:
        low, high = consumer.get_watermark_offsets(
            TopicPartition(topic, tp.partition), timeout=timeout_s
        )
        start = max(tp.offset, low) if tp.offset >= 0 else low
        ranges[tp.partition] = (start, high)
        assign.append(TopicPartition(topic, tp.partition, start))
    consumer.assign(assign)
    return ranges


def _topic_max_message_bytes(common: Mapping[str, Any], topic: str, timeout_s: float) -> int | None:
    """The topic's ``max.message.bytes`` on the broker, or None when it cannot be read."""
    from stream_scorer.kafka.topics import topic_max_message_bytes

    try:
        return topic_max_message_bytes(dict(common), topic, timeout_s)
    except BrokerError as exc:  # only for the error message: never hide the refusal behind it
        log.warning("cannot read max.message.bytes of topic %s: %s", topic, exc)
        return None


class _Publisher:
    """The replay's transactional producer, sized for the records it publishes.

    ``message.max.bytes`` starts at librdkafka's default (or the configuration's value, which is
    then kept) and grows, between transactions, to the largest record read plus framing room:
    the producer is re-created with the same transactional id, which fences the previous one.
    """

    def __init__(
        self,
        common: Mapping[str, Any],
        transactional: Mapping[str, str],
        target: str,
        timeout_s: float,
        private_key: rsa.RSAPrivateKey | None = None,
        signer: Signer | None = None,
    ) -> None:
        """Create the producer, initialise its transactions.

        ``private_key`` opens encrypted dead letters; ``signer`` verifies their signatures.
        """
        self._common = dict(common)
        self._settings = {**self._common, **transactional}
        self._target = target
        self._timeout = timeout_s
        self._private_key = private_key
        self._signer = signer
        self._configured = "message.max.bytes" in self._settings
        self.limit = int(self._settings.get("message.max.bytes", CLIENT_MESSAGE_MAX_BYTES))
        #: (dead letter, size, error) of each record the broker refused in this transaction
        self._refused: list[tuple[str, int, KafkaError]] = []
        self._producer = self._start()

    def _start(self) -> Any:
        producer = Producer({**self._settings, "message.max.bytes": str(self.limit)})
        producer.init_transactions(self._timeout)
        return producer

    def _fit(self, size: int) -> None:
        """Re-create the producer with a limit for a record of ``size`` bytes, if needed."""
        need = size + RECORD_OVERHEAD_BYTES
        if self._configured or need <= self.limit:
            return
        log.info(
            "a dead letter of %d bytes: producer message.max.bytes %d -> %d",
            size,
            self.limit,
            need,
        )
        self.limit = need
        self._producer.flush(self._timeout)  # nothing is in flight between transactions
        self._producer = self._start()

    def _delivered(self, source: str, size: int, err: Any, _msg: Any) -> None:
        """Delivery report: remember a refusal (never raises)."""
        if err is not None:
            self._refused.append((source, size, err))

    def publish(
        self, consumer: Any, chosen: list[Any], last: dict[int, int], topic: str
    ) -> dict[str, str]:
        """One transaction: the chosen records and the consumed dead-letter offsets.

        Returns the chosen dead letters refused (not published), by ``topic/partition/offset``.

        Raises:
            BrokerError: the client or the target topic refused a record (names the limit).
            KafkaException: another transaction error.
        """
        records = []
        refused: dict[str, str] = {}
        for msg in chosen:
            source = f"{msg.topic()}/{msg.partition()}/{msg.offset()}"
            headers = replay_headers(msg.headers() or [], source)
            try:
                key, value = self._original(msg, source)
            except _Refused as exc:
                refused[source] = str(exc)
                continue
            size = record_size(key, value, headers)
            records.append((key, value, headers, source, size))
        if records:
            self._fit(max(size for *_rest, size in records))
        producer, self._refused = self._producer, []
        producer.begin_transaction()
        try:
            for key, value, headers, source, size in records:
                try:
                    produce_retrying(
                        producer,
                        self._target,
                        value,
                        timeout_s=self._timeout,
                        key=key,
                        headers=headers,
                        on_delivery=partial(self._delivered, source, size),
                    )
                except KafkaException as exc:
                    err = exc.args[0] if exc.args else None
                    if isinstance(err, KafkaError) and err.code() == KafkaError.MSG_SIZE_TOO_LARGE:
                        raise self._client_refused(source, size) from exc
                    raise
            offsets = [TopicPartition(topic, p, o + 1) for p, o in sorted(last.items())]
            group = consumer.consumer_group_metadata()
            producer.send_offsets_to_transaction(offsets, group, self._timeout)
            producer.commit_transaction(self._timeout)
        except (KafkaException, BrokerError) as exc:
            producer.poll(0)  # the delivery reports: which record the broker refused
            self._abort()
            if self._refused and not isinstance(exc, BrokerError):
                raise self._broker_refused(*self._refused[0]) from exc
            raise
        return refused

    def _original(self, msg: Any, source: str) -> tuple[bytes | None, bytes | None]:
        """The record's original key and value: as read, or decrypted (never logged).

        Raises:
            _Refused: not replayable as the record it names (stripped, forged, moved, damaged).
            ConfigError: encrypted and no key (or another key) given; dropped by configuration.
        """
        headers = _headers(msg)
        if self._signer is not None:
            try:
                self._signer.verify(msg.key(), msg.value(), list(msg.headers() or []))
            except SignatureError as exc:
                raise _Refused(f"signature: {exc}") from None
        payload = headers.get(hdr.PAYLOAD)
        if payload is None:
            return msg.key(), msg.value()
        if payload == STRIPPED:
            size = headers.get(hdr.ORIGINAL_VALUE_SIZE, b"?").decode(errors="replace")
            raise _Refused(
                f"written without its key and value ({size} bytes of value: too large for the "
                "dead-letter topic); the original is at the __connect.errors.topic/partition/"
                "offset it names, while the input topic retains it"
            )
        if payload == DROPPED:
            raise ConfigError(
                "dead_letter.payload",
                f"dead letter {source} was written without its key and value (drop): it "
                "cannot be replayed",
            )
        key_id = headers.get(hdr.ENCRYPTION_KEY_ID, b"?").decode(errors="replace")
        if self._private_key is None:
            raise ConfigError(
                "--private-key",
                f"dead letter {source} is encrypted (key id {key_id}): give the private key "
                "that opens it with --private-key FILE; nothing was replayed from this batch",
            )
        try:
            opened = open_sealed(self._private_key, msg.value(), headers)
        except EnvelopeKeyError as exc:
            raise ConfigError("--private-key", f"dead letter {source}: {exc}") from None
        except EnvelopeError as exc:
            raise _Refused(f"encrypted payload: {exc}") from None
        if not opened.bound:
            log.warning(
                "dead letter %s is encrypted with the v1 scheme, which does not bind it to its "
                "record: replayed as the record its headers name, unverified",
                source,
            )
        return opened.key, opened.value

    def _abort(self) -> None:
        try:
            self._producer.abort_transaction(self._timeout)
        except KafkaException as exc:  # the broker ends it at the transaction timeout anyway
            log.warning("cannot abort the replay's transaction: %s", exc)

    def _client_refused(self, source: str, size: int) -> BrokerError:
        where = "kafka.client" if self._configured else "sized from the records read"
        return BrokerError(
            f"the client refused dead letter {source} ({size} bytes): larger than its "
            f"message.max.bytes = {self.limit} ({where})",
            topic=self._target,
        )

    def _broker_refused(self, source: str, size: int, err: KafkaError) -> BrokerError:
        if err.code() != KafkaError.MSG_SIZE_TOO_LARGE:
            return BrokerError(
                f"topic {self._target!r} refused dead letter {source}: {err}", topic=self._target
            )
        limit = _topic_max_message_bytes(self._common, self._target, self._timeout)
        value = "" if limit is None else f" = {limit}"
        return BrokerError(
            f"topic {self._target!r} refused dead letter {source} ({size} bytes): larger than "
            f"the topic's max.message.bytes{value} on the broker (the client allowed "
            f"message.max.bytes = {self.limit}); raise the topic's limit or replay elsewhere",
            topic=self._target,
        )
