"""``stream-scorer evaluate``: predictions joined with their outcomes, metrics per version.

One consumer (group ``evaluate.group_id``, the ``range`` assignor, so partition *i* of every
topic goes to the same member) reads the prediction topics and the outcomes topic; the join
(``evaluate.join``) pairs them by event id (a prediction's ``input_id``); each pair is counted in
the current window of its prediction's model version (``evaluate.stats``). A window closes, for
every version at once, after ``window_events`` pairs or ``window_s`` seconds: one evaluation
record per version goes to ``evaluate.topic``, the metrics to Prometheus, then the consumer's
positions are committed.

Restart: the join state lives in memory only. On every assignment each partition is read again
from ``min(committed offset, first offset at now - horizon)`` (``offsets_for_times``), so the
predictions and outcomes still inside the horizon are in the state again; a record below the
committed offset was read before, and a pair of two such records was counted in a written window
(``join.Pair.counted``), so nothing is counted twice and nothing read after the last window is
lost. A rebalance (revocation) closes the window first, for the same reason.
"""

from __future__ import annotations

import io
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast

import fastavro
import numpy as np
from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from prometheus_client import CONTENT_TYPE_LATEST

from stream_scorer.config import Config, EvaluateConfig, client_settings, kafka_client
from stream_scorer.contracts import EVALUATION_SCHEMA_V1
from stream_scorer.contracts.manifest import read_manifest
from stream_scorer.errors import (
    BrokerError,
    ConfigError,
    DeliveryError,
    ModelError,
    SchemaError,
    StreamScorerError,
)
from stream_scorer.evaluate.decide import Decision, Evidence, Rollout, Rule, decide
from stream_scorer.evaluate.join import JoinState, Outcome, Pair, Prediction
from stream_scorer.evaluate.metrics import EvaluationMetrics
from stream_scorer.evaluate.stats import ClassifierStats, RegressorStats, Stats
from stream_scorer.kafka.topics import kafka_busy
from stream_scorer.registry import RegistryClient, SchemaKey
from stream_scorer.retry import retrying
from stream_scorer.stages.drift import (
    Counts,
    bins_of,
    expected_psi,
    population_stability,
    reference_counts,
)
from stream_scorer.stages.framing import SchemaSource, frame_of
from stream_scorer.stages.records import Message, Reason

log = logging.getLogger(__name__)

PREDICTION = "prediction"
OUTCOME = "outcome"


def plain_schema(schema: Any) -> Any:
    """``schema`` without logical types (timestamps read as the longs they are written as)."""
    if isinstance(schema, dict):
        return {k: plain_schema(v) for k, v in schema.items() if k != "logicalType"}
    if isinstance(schema, list):
        return [plain_schema(s) for s in schema]
    return schema


def evaluation_schema() -> dict[str, Any]:
    """The parsed evaluation record schema shipped in the package."""
    parsed = fastavro.parse_schema(json.loads(EVALUATION_SCHEMA_V1.read_text(encoding="utf-8")))
    return cast(dict[str, Any], parsed)


def read_evaluation(value: bytes) -> dict[str, Any]:
    """One evaluation record from its bytes (schemaless Avro of ``evaluation.v1.avsc``)."""
    schema = plain_schema(json.loads(EVALUATION_SCHEMA_V1.read_text(encoding="utf-8")))
    return cast(dict[str, Any], fastavro.schemaless_reader(io.BytesIO(value), schema, None))


class AvroReader:
    """Reads records of one reader schema, bare or in the Confluent wire format."""

    def __init__(self, schema_text: str, framed: bool, registry: SchemaSource | None) -> None:
        """Parse the reader schema (logical types dropped: times stay longs)."""
        self._reader = fastavro.parse_schema(plain_schema(json.loads(schema_text)))
        self._framed = framed
        self._registry = registry
        self._writers: dict[SchemaKey, Any] = {}

    def read(self, msg: Message) -> dict[str, Any]:
        """The record, resolved against the reader schema.

        Raises:
            ValueError: the record cannot be read (skipped and counted by the caller).
            RegistryError: the registry cannot be reached.
        """
        value = msg.value()
        if not value:
            raise ValueError("empty or null value")
        writer, start = self._reader, 0
        if self._framed:
            frame = frame_of(msg)
            if isinstance(frame, Reason):
                raise ValueError(frame.value)
            key, start = frame
            if key not in self._writers:
                assert self._registry is not None  # framed needs registry.url (config check)
                text = self._registry.writer_schema(key)
                if text is None:
                    raise ValueError(f"unknown schema {key}")
                self._writers[key] = fastavro.parse_schema(plain_schema(json.loads(text)))
            writer = self._writers[key]
        try:
            record = fastavro.schemaless_reader(io.BytesIO(value[start:]), writer, self._reader)
        except Exception as exc:  # fastavro raises many types on bad bytes
            raise ValueError(f"not readable: {exc}") from exc
        if not isinstance(record, dict):
            raise ValueError("not a record")
        return record


@dataclass
class Window:
    """The pairs counted since the last close, per version."""

    bins: int
    opened_ms: int
    stats: dict[str, Stats] = field(default_factory=dict)
    unlabelled: dict[str, int] = field(default_factory=dict)
    pairs: int = 0
    predicted: dict[str, Counts] = field(default_factory=dict)
    """Per version with a prediction reference: its predictions' counts per reference bin."""

    def add(self, pair: Pair) -> bool:
        """Count a pair; False when its outcome does not fit the task (not a 0/1 label)."""
        p, o = pair.prediction, pair.outcome
        stats = self.stats.get(p.version)
        if p.label is not None:
            if o.value not in (0.0, 1.0):
                return False
            if stats is None:
                stats = self.stats[p.version] = ClassifierStats(self.bins)
            if not isinstance(stats, ClassifierStats):
                return False
            stats.add(p.value, p.label, int(o.value))
        else:
            if stats is None:
                stats = self.stats[p.version] = RegressorStats()
            if not isinstance(stats, RegressorStats):
                return False
            stats.add(p.value, o.value)
        self.pairs += 1
        return True


@dataclass(frozen=True)
class PredictionReference:
    """A version's packed prediction reference (``Manifest.reference["prediction"]``)."""

    shares: Mapping[str, Any]
    """Its ``edges``, ``shares`` and ``missing`` (``stages.drift.reference_counts``)."""
    rows: int
    """The reference sample's rows."""
    bins: int
    """Bins with a reference share above 0 (missing included): ``expected_psi``'s B."""


@dataclass
class EvaluateReport:
    """What one run did."""

    windows: int = 0
    pairs: int = 0
    decisions: list[dict[str, Any]] = field(default_factory=list)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    return None


class Evaluator:
    """The evaluator's loop and state (see the module doc)."""

    def __init__(
        self,
        cfg: Config,
        *,
        rollout: Rollout | None = None,
        apply: bool = False,
        metrics: EvaluationMetrics | None = None,
        on_decision: Callable[[Decision, bool], None] | None = None,
        fetch: Callable[[str], Path] | None = None,
    ) -> None:
        """Prepare (no I/O yet).

        Args:
            cfg: the configuration; its ``evaluate`` section must be set.
            rollout: where decisions come from and go (None: no decisions).
            apply: carry decisions out (False: ``--dry-run``, decisions only written).
            metrics: the Prometheus metrics (default: a new registry).
            on_decision: called with each decision and whether it was applied.
            fetch: a version's model directory (the store's ``fetch``), whose manifest's
                prediction reference the predictions' PSI is taken against (None: no PSI).

        Raises:
            ConfigError: no ``evaluate`` section, or a ``--decide`` without ``evaluate.decide``.
        """
        if cfg.evaluate is None:
            raise ConfigError("evaluate", "stream-scorer evaluate needs an evaluate: section")
        ev: EvaluateConfig = cfg.evaluate
        if rollout is not None and ev.decide is None:
            raise ConfigError("evaluate.decide", "--decide needs an evaluate.decide section")
        self.cfg, self.ev = cfg, ev
        self.group = ev.group_id or f"{cfg.input.group_id}-evaluate"
        self.prediction_topics = ev.prediction_topics or tuple(e.output.topic for e in cfg.entries)
        self.rollout, self.apply, self.on_decision = rollout, apply, on_decision
        self.metrics = metrics or EvaluationMetrics(ev.model_name, ev.max_versions)
        registry = RegistryClient.from_config(cfg.registry) if cfg.registry.url else None
        self._predictions = AvroReader(
            cfg.first.output.schema.read_text(encoding="utf-8"),
            cfg.first.output.format == "confluent",
            registry,
        )
        out = ev.outcomes
        self._outcomes = (
            None
            if out.format == "json" or out.schema_file is None
            else AvroReader(
                out.schema_file.read_text(encoding="utf-8"), out.format == "confluent", registry
            )
        )
        self._schema = evaluation_schema()
        self.state = JoinState(int(ev.horizon_s * 1000), ev.max_pending)
        self.window = Window(ev.bins, int(time.time() * 1000))
        self.report = EvaluateReport()
        self._committed: dict[tuple[str, int], int] = {}
        self._acted: set[str] = set()
        self._failure: BaseException | None = None
        self._delivery_errors: list[str] = []
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        self._fetch = fetch
        self._references: dict[str, PredictionReference | None] = {}
        self._values: dict[str, list[float]] = {}

    # --- Kafka ---------------------------------------------------------------------------

    def _consumer_settings(self) -> dict[str, str]:
        settings = {
            "bootstrap.servers": self.cfg.kafka.bootstrap_servers,
            "group.id": self.group,
            "client.id": f"stream-scorer-evaluate-{self.group}",
            "enable.auto.commit": "false",
            "enable.auto.offset.store": "false",
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            **kafka_client(self.cfg.kafka),
            **self.cfg.kafka.consumer,
        }
        # partition i of every topic to one member: the join needs co-partitioned topics read
        # together (cooperative-sticky does not promise that); eager, so that every rebalance
        # revokes everything and the state is rebuilt whole
        if settings.get("group.protocol", "classic") != "classic":
            raise ConfigError(
                "kafka.consumer.group.protocol",
                "evaluate needs the classic protocol (its eager range assignment rebuilds the "
                "join state whole at each rebalance)",
            )
        settings["partition.assignment.strategy"] = "range"
        return settings

    def check_partitions(self, consumer: Consumer) -> dict[str, int]:
        """Partition counts of the topics read; refuse (or warn) when they differ.

        Raises:
            ConfigError: a topic does not exist; or the counts differ and
                ``evaluate.require_copartitioned`` is true.
        """
        counts: dict[str, int] = {}
        for key, topic in [
            *(("evaluate.prediction_topics", t) for t in self.prediction_topics),
            ("evaluate.outcomes.topic", self.ev.outcomes.topic),
        ]:
            try:
                meta = consumer.list_topics(topic, timeout=self.cfg.kafka.unreachable_timeout_s)
            except KafkaException as exc:
                raise BrokerError(f"evaluate: no broker answered: {exc}") from exc
            found = meta.topics.get(topic)
            unknown = (
                found is not None
                and found.error is not None
                and (found.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART)
            )
            if found is None or unknown or not found.partitions:
                raise ConfigError(key, f"topic {topic!r} does not exist")
            counts[topic] = len(found.partitions)
        if len(set(counts.values())) > 1:
            message = (
                f"partition counts differ ({counts}): a prediction and its outcome may land in "
                "different evaluators and never meet; give the topics the same partition count "
                "(and the same key and partitioner)"
            )
            if self.ev.require_copartitioned:
                raise ConfigError("evaluate.outcomes.topic", message)
            log.warning("evaluate: %s; going on (evaluate.require_copartitioned: false)", message)
        return counts

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        try:
            # a partition without its leader yet (a new topic, a broker restart), a busy
            # coordinator: retried with the retry policy up to kafka.unreachable_timeout_s
            retrying(
                self.cfg.kafka.unreachable_timeout_s,
                "evaluate: read back over the horizon",
                server="broker",
                policy=self.cfg.retry.policy(),
                outage=kafka_busy,
            )(self._rebuild, consumer, partitions)
        except BaseException as exc:  # callbacks never raise: the loop does
            self._failure = exc

    def _rebuild(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Start each partition at min(committed, now - horizon): the state is read again."""
        timeout = self.cfg.kafka.unreachable_timeout_s
        committed = consumer.committed(partitions, timeout=timeout)
        # the ends first: when no record is inside the horizon, reading starts at the end as it
        # was before the time lookup, so a record written in between is never skipped
        ends = [
            consumer.get_watermark_offsets(TopicPartition(p.topic, p.partition), timeout=timeout)[1]
            for p in partitions
        ]
        since = int(time.time() * 1000 - self.ev.horizon_s * 1000)
        by_time = consumer.offsets_for_times(
            [TopicPartition(p.topic, p.partition, since) for p in partitions], timeout=timeout
        )
        starts = []
        for c, t, end in zip(committed, by_time, ends, strict=True):
            done = c.offset if c.offset >= 0 else -1
            self._committed[(c.topic, c.partition)] = done
            start = t.offset if t.offset >= 0 else end
            if 0 <= done < start:
                start = done
            starts.append(TopicPartition(c.topic, c.partition, start))
        log.info(
            "evaluate: assigned %d partitions, reading back from %s",
            len(starts),
            {f"{p.topic}[{p.partition}]": p.offset for p in starts},
        )
        consumer.assign(starts)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        try:
            self.close_window()
            self.state = JoinState(int(self.ev.horizon_s * 1000), self.ev.max_pending)
            self._committed.clear()
        except BaseException as exc:
            self._failure = exc

    def _delivered(self, err: KafkaError | None, _msg: object) -> None:
        if err is not None:
            self._delivery_errors.append(str(err))

    # --- records -------------------------------------------------------------------------

    def _seen(self, msg: Message) -> bool:
        return (msg.offset() or 0) < self._committed.get(
            (msg.topic() or "", msg.partition() or 0), -1
        )

    def _time(self, msg: Message) -> int:
        kind, ts = msg.timestamp()
        return int(ts) if kind and ts >= 0 else int(time.time() * 1000)

    def handle(self, msg: Message) -> None:
        """Read one record into the join; count the pair it completes."""
        if msg.topic() == self.ev.outcomes.topic:
            pair = self._outcome(msg)
        else:
            pair = self._prediction(msg)
        if pair is not None and pair.counted:
            if self.window.add(pair):
                self.report.pairs += 1
            else:
                self.metrics.invalid.labels(OUTCOME).inc()

    def _prediction(self, msg: Message) -> Pair | None:
        try:
            rec = self._predictions.read(msg)
            value = float(rec["prediction"])
            label = rec["label"]
            p = Prediction(
                str(rec["model_version"]), value, label, int(rec["event_time"]), self._seen(msg)
            )
            event_id = str(rec["input_id"])
        except (ValueError, KeyError, TypeError) as exc:
            log.debug("evaluate: unreadable prediction: %s", exc)
            self.metrics.invalid.labels(PREDICTION).inc()
            return None
        if self._fetch is not None and not p.seen:  # seen: in a window written before
            values = self._values.setdefault(p.version, [])
            values.append(value)
            if len(values) >= 4096:
                self._count_predictions()
        return self.state.add_prediction(event_id, p)

    # --- prediction drift ----------------------------------------------------------------

    def _reference(self, version: str) -> PredictionReference | None:
        """The prediction reference packed with ``version`` (cached); None: none to compare.

        A version without one (or with a malformed one) is said once; a version that cannot be
        fetched now is said and asked again at the next window (a store outage passes).
        """
        if version in self._references:
            return self._references[version]
        assert self._fetch is not None
        try:
            manifest = read_manifest(self._fetch(version))
        except StreamScorerError as exc:
            log.warning(
                "evaluate: no prediction drift for version %s this window: %s", version, exc
            )
            return None
        ref: PredictionReference | None = None
        try:
            bins = bins_of(manifest.reference, manifest.features)
        except ModelError as exc:
            log.warning("evaluate: version %s: %s: no drift check", version, exc)
        else:
            if bins is None:
                log.info(
                    "evaluate: version %s was packed without reference bins "
                    "(model pack --sample): no drift check",
                    version,
                )
            else:
                ref = PredictionReference(
                    manifest.reference["prediction"],
                    bins.rows,
                    int(np.count_nonzero(bins.prediction_reference > 0)),
                )
        self._references[version] = ref
        return ref

    def _count_predictions(self) -> None:
        """Bin the buffered prediction values into the window's counts, per version."""
        values, self._values = self._values, {}
        for version, batch in values.items():
            ref = self._reference(version)
            if ref is None:
                continue
            counts = reference_counts(ref.shares, batch)
            have = self.window.predicted.get(version)
            self.window.predicted[version] = counts if have is None else have + counts

    def _drift(self, window: Window, version: str) -> tuple[int, float | None, float]:
        """(predictions, their PSI, its no-drift noise) of ``version`` in ``window``."""
        counts = window.predicted.get(version)
        ref = self._references.get(version)
        if counts is None or ref is None:
            return 0, None, 0.0
        n = int(counts.sum())
        return n, population_stability(ref.shares, counts), expected_psi(ref.bins, ref.rows, n)

    def _outcome(self, msg: Message) -> Pair | None:
        out = self.ev.outcomes
        try:
            if self._outcomes is None:
                rec = json.loads(msg.value() or b"")
                if not isinstance(rec, dict):
                    raise ValueError("not a JSON object")
            else:
                rec = self._outcomes.read(msg)
            value = _number(rec[out.value_field])
            if value is None:
                raise ValueError(f"{out.value_field} is not a number")
            when = int(rec[out.time_field]) if out.time_field else self._time(msg)
            event_id = str(rec[out.id_field])
        except (ValueError, KeyError, TypeError) as exc:
            log.debug("evaluate: unreadable outcome: %s", exc)
            self.metrics.invalid.labels(OUTCOME).inc()
            return None
        return self.state.add_outcome(event_id, Outcome(value, when, self._seen(msg)))

    # --- windows -------------------------------------------------------------------------

    def _take_counts(self) -> None:
        counts = self.state.take_counts()
        for version, n in counts.unlabelled.items():
            self.window.unlabelled[version] = self.window.unlabelled.get(version, 0) + n
            self.metrics.unlabelled.labels(self.metrics.model, version).inc(n)
        self.metrics.unmatched.inc(counts.unmatched)
        self.metrics.late.inc(counts.late)
        self.metrics.dropped.labels(PREDICTION).inc(counts.dropped_predictions)
        self.metrics.dropped.labels(OUTCOME).inc(counts.dropped_outcomes)
        self.metrics.pending.labels(PREDICTION).set(len(self.state.predictions))
        self.metrics.pending.labels(OUTCOME).set(len(self.state.outcomes))

    def due(self, now_ms: int) -> bool:
        """Whether the window is full or old enough to close."""
        ev = self.ev
        if ev.window_events and self.window.pairs >= ev.window_events:
            return True
        return bool(ev.window_s) and now_ms - self.window.opened_ms >= ev.window_s * 1000

    def close_window(self) -> None:
        """Write the window's records, export its metrics, commit the positions, open anew.

        Raises:
            DeliveryError: an evaluation record was not written.
        """
        self._take_counts()
        self._count_predictions()
        window = self.window
        now_ms = int(time.time() * 1000)
        self.window = Window(self.ev.bins, now_ms)
        versions = sorted(set(window.stats) | set(window.unlabelled) | set(window.predicted))
        if not versions:
            return
        decided = self._decide(window)
        records = []
        for version in versions:
            stats = window.stats.get(version)
            summary = stats.summary() if stats is not None else {}
            n = stats.n if stats is not None else 0
            predicted, psi, noise = self._drift(window, version)
            self.metrics.observe_window(version, n, summary, psi)
            record: dict[str, Any] = {
                "evaluator": self.group,
                "model": self.ev.model_name,
                "model_version": version,
                "task": "regression" if isinstance(stats, RegressorStats) else "classification",
                "window_start": window.opened_ms,
                "window_end": now_ms,
                "outcomes": n,
                "positives": stats.positives if isinstance(stats, ClassifierStats) else None,
                "unlabelled": window.unlabelled.get(version, 0),
                **summary,
                "predictions": predicted if psi is not None else None,
                "prediction_psi": psi,
                "prediction_psi_expected": noise if psi is not None else None,
                "decision": decided.get(version),
            }
            records.append(record)
        self._write(records)
        self.metrics.windows.inc()
        self.report.windows += 1
        self._commit()

    def _write(self, records: list[dict[str, Any]]) -> None:
        producer = self._producer
        if producer is None:
            return
        for record in records:
            buf = io.BytesIO()
            fastavro.schemaless_writer(buf, self._schema, record)
            producer.produce(
                self.ev.topic,
                buf.getvalue(),
                record["model_version"].encode(),
                on_delivery=self._delivered,
            )
        left = producer.flush(self.cfg.kafka.unreachable_timeout_s)
        if left or self._delivery_errors:
            raise DeliveryError(
                f"evaluation records not written to {self.ev.topic}: "
                f"{self._delivery_errors[:1] or [f'{left} still queued']}"
            )

    def _commit(self) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        assigned = consumer.assignment()
        if not assigned:
            return
        # never backwards: while a restart reads back over the horizon, a position is below the
        # committed offset, and committing it would count those pairs again after a crash
        positions = [
            TopicPartition(p.topic, p.partition, max(p.offset, self._committed.get(key, -1)))
            for p in consumer.position(assigned)
            if p.offset >= 0 and (key := (p.topic, p.partition))
        ]
        if positions:
            consumer.commit(offsets=positions, asynchronous=False)
            for p in positions:
                self._committed[(p.topic, p.partition)] = p.offset

    def _decide(self, window: Window) -> dict[str, dict[str, Any]]:
        """The decision on the challenger of this window (by version), carried out if asked."""
        rule_cfg = self.ev.decide
        if self.rollout is None or rule_cfg is None:
            return {}
        pair = self.rollout.versions()
        if pair is None or pair[0] == pair[1]:
            return {}
        rule = Rule(
            rule_cfg.metric,
            rule_cfg.min_outcomes,
            rule_cfg.promote_margin,
            rule_cfg.rollback_margin,
            rule_cfg.max_prediction_psi,
        )

        def evidence(version: str) -> Evidence:
            predicted, psi, noise = self._drift(window, version)
            stats = window.stats.get(version)
            if stats is None:
                return Evidence(version, 0, None, predicted, psi, noise)
            return Evidence(
                version, stats.n, stats.summary().get(rule.metric), predicted, psi, noise
            )

        champion, challenger = pair
        if challenger not in window.stats and challenger not in window.predicted:
            return {}
        decision = decide(rule, evidence(champion), evidence(challenger))
        applied = False
        if decision.action != "keep" and self.apply and challenger not in self._acted:
            moved = (
                self.rollout.promote() if decision.action == "promote" else self.rollout.rollback()
            )
            self._acted.add(challenger)
            applied = True
            log.warning(
                "evaluate: %s %s: %s (%s)", decision.action, challenger, moved, decision.reason
            )
        else:
            log.info("evaluate: %s %s: %s", decision.action, challenger, decision.reason)
        self.metrics.decisions.labels(decision.action).inc()
        self.report.decisions.append(decision_dict(decision, applied))
        if self.on_decision is not None:
            self.on_decision(decision, applied)
        return {
            challenger: {
                "action": decision.action,
                "applied": applied,
                "metric": decision.metric,
                "champion_version": champion,
                "champion_value": decision.champion.value,
                "champion_outcomes": decision.champion.n,
                "challenger_version": challenger,
                "challenger_value": decision.challenger.value,
                "challenger_outcomes": decision.challenger.n,
                "gap": decision.gap,
                "reason": decision.reason,
                "challenger_predictions": decision.challenger.predictions,
                "challenger_psi": decision.challenger.psi,
                "challenger_psi_expected": decision.challenger.psi_expected,
                "psi_bound": decision.psi_bound,
            }
        }

    # --- the loop ------------------------------------------------------------------------

    def run(self, stop: Callable[[], bool] | threading.Event) -> EvaluateReport:
        """Consume until ``stop`` is set; close the last window; return what was done.

        Raises:
            ConfigError: a topic is missing, or the topics are not co-partitioned.
            BrokerError: the consumer failed.
            DeliveryError: an evaluation record was not written.
        """
        stopped = stop.is_set if isinstance(stop, threading.Event) else stop
        consumer = Consumer(self._consumer_settings())
        self._consumer = consumer
        settings = client_settings(self.cfg)
        settings.update(self.cfg.kafka.producer)
        self._producer = Producer(
            {**settings, "enable.idempotence": "true", "acks": "all", "linger.ms": "5"}
        )
        try:
            self.check_partitions(consumer)
            consumer.subscribe(
                [*self.prediction_topics, self.ev.outcomes.topic],
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
            )
            while not stopped():
                for msg in consumer.consume(500, timeout=0.2):
                    err = msg.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            continue
                        if err.fatal() or not err.retriable():
                            raise BrokerError(f"evaluate: consumer failed: {err}")
                        log.warning("evaluate: consumer: %s", err)
                        continue
                    self.handle(cast(Message, msg))
                if self._failure is not None:
                    raise self._failure
                self._take_counts()
                if self.due(int(time.time() * 1000)):
                    self.close_window()
            self.close_window()
            return self.report
        finally:
            consumer.close()
            self._consumer = None
            self._producer.flush(5)


def decision_dict(decision: Decision, applied: bool) -> dict[str, Any]:
    """A decision and its evidence as plain data (``--dry-run`` prints it as a JSON line).

    The drift evidence (each version's ``predictions``, ``psi``, ``psi_expected``, and
    ``psi_bound``) only when the rule has ``max_prediction_psi``: the line is unchanged without.
    """
    drift = decision.psi_bound is not None

    def evidence(e: Evidence) -> dict[str, Any]:
        out = vars(e).copy()
        if not drift:
            for key in ("predictions", "psi", "psi_expected"):
                out.pop(key)
        return out

    out = {
        "action": decision.action,
        "applied": applied,
        "metric": decision.metric,
        "champion": evidence(decision.champion),
        "challenger": evidence(decision.challenger),
        "gap": decision.gap,
        "reason": decision.reason,
    }
    if drift:
        out["psi_bound"] = decision.psi_bound
    return out


def serve_metrics(
    metrics: EvaluationMetrics, host: str, port: int, tls: ssl.SSLContext | None = None
) -> ThreadingHTTPServer | None:
    """Serve ``/metrics`` on ``host:port`` (0: not at all), HTTPS with ``tls``; the server.

    The worker's server (``worker.health.http_server``), so ``metrics.tls_cert``/``tls_key``
    hold here too. It serves from a daemon thread until the process ends or it is shut down.
    """
    if not port:
        return None
    from stream_scorer.worker.health import http_server

    def render() -> tuple[int, bytes, str]:
        return 200, metrics.render(), CONTENT_TYPE_LATEST

    try:
        server = http_server(host, port, {"/metrics": render}, tls)
    except OSError as exc:
        raise ConfigError(
            "evaluate.metrics_port", f"cannot listen on {host}:{port}: {exc.strerror or exc}"
        ) from exc
    threading.Thread(target=server.serve_forever, name="evaluate-http", daemon=True).start()
    return server


__all__ = ["EvaluateReport", "Evaluator", "SchemaError", "serve_metrics"]
