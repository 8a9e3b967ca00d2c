"""The worker: wire the stages together and run the main loop.

poll a batch → decode/features/score/encode (``Pipeline``) → produce → store delivered offsets
→ health, until a signal, a limit or an error stops it. Then: flush, commit, leave the group.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from types import FrameType

from confluent_kafka import Producer

from stream_scorer.config import Config, consumer_settings, producer_settings, redacted
from stream_scorer.decode import Decoder, load_schema, record_fields
from stream_scorer.encode import PredictionEncoder
from stream_scorer.errors import BrokerError, ConfigError, SchemaError
from stream_scorer.fastpath import build_fast_path
from stream_scorer.features import FeatureBuilder, check_schema
from stream_scorer.metrics import Metrics
from stream_scorer.offsets import OffsetTracker
from stream_scorer.pipeline import Pipeline
from stream_scorer.score import Scorer
from stream_scorer.sink import Sink, SinkContext
from stream_scorer.source import Partitions, Source

log = logging.getLogger(__name__)


@dataclass
class WorkerReport:
    """What one worker did; printed as JSON when it exits."""

    worker_id: str
    consumed: int = 0
    predictions: int = 0
    dead_letters: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    elapsed_s: float = 0.0
    stopped_by: str = ""


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop finishes its batch, then drains and leaves."""

    def __init__(self) -> None:
        """Create an unset flag."""
        self.reason = ""

    def set(self, reason: str) -> None:
        """Ask the loop to stop."""
        self.reason = self.reason or reason

    def __bool__(self) -> bool:
        return bool(self.reason)

    @contextmanager
    def on_signals(self) -> Iterator[StopFlag]:
        """Install SIGTERM/SIGINT handlers for the duration of the block."""

        def handler(signum: int, _frame: FrameType | None) -> None:
            self.set(signal.Signals(signum).name)

        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


def build_pipeline(cfg: Config, metrics: Metrics) -> tuple[Pipeline, Scorer]:
    """Load the schemas and the model and check they fit each other."""
    scorer = Scorer(cfg.model.path, nthread=cfg.model.nthread, threshold=cfg.model.threshold)
    input_schema = load_schema(cfg.input.schema)
    fields = record_fields(input_schema)
    check_schema(scorer.manifest.features, fields)
    for key, name in (
        ("input.id_field", cfg.input.id_field),
        ("input.event_time_field", cfg.input.event_time_field),
    ):
        if name and name.split(".")[0] not in fields:
            raise ConfigError(key, f"field {name!r} is not in the input schema {cfg.input.schema}")
    try:
        encoder = PredictionEncoder(load_schema(cfg.output.schema))
    except SchemaError as exc:
        raise ConfigError("output.schema", str(exc)) from exc
    pipeline = Pipeline(
        Decoder(input_schema, cfg.input.max_message_bytes),
        FeatureBuilder(scorer.manifest.features),
        scorer,
        encoder,
        id_field=cfg.input.id_field,
        event_time_field=cfg.input.event_time_field,
        timer=metrics.observe_stage,
        fast=build_fast_path(
            input_schema,
            scorer.manifest.features,
            id_field=cfg.input.id_field,
            event_time_field=cfg.input.event_time_field,
            max_message_bytes=cfg.input.max_message_bytes,
            enabled=cfg.input.fast_path,
        ),
    )
    return pipeline, scorer


def run_worker(cfg: Config, stop: StopFlag | None = None) -> WorkerReport:
    """Run one worker until stopped; return what it did.

    Raises:
        StreamScorerError: a configuration, model, broker or delivery failure (exit non-zero).
    """
    worker_id = cfg.worker.id or f"{socket.gethostname()}-{os.getpid()}"
    report = WorkerReport(worker_id)
    stop = stop if stop is not None else StopFlag()
    metrics = Metrics()
    pipeline, scorer = build_pipeline(cfg, metrics)
    metrics.model_info.labels(scorer.model_version).set(1)
    tracker = OffsetTracker()
    with ExitStack() as stack:
        if cfg.metrics.port:
            stack.callback(metrics.serve(cfg.metrics.port, cfg.metrics.host).shutdown)
        psettings = producer_settings(cfg, worker_id)
        log.info("producer settings: %s", redacted(psettings))
        producer = Producer(psettings)
        ctx = SinkContext(
            cfg.output.topic,
            cfg.dead_letter.topic,
            cfg.input.group_id,
            worker_id,
            scorer.model_version,
            cfg.kafka.unreachable_timeout_s,
        )
        sink = Sink(producer, ctx, tracker, metrics)

        def release(partitions: Partitions) -> None:
            # revoke: store what is delivered; librdkafka commits stored offsets of revoked
            # partitions itself (auto-commit), without blocking this callback on the group
            sink.flush(cfg.worker.shutdown_timeout_s)
            source.store(tracker.committable(partitions))
            tracker.forget(partitions)

        csettings = consumer_settings(cfg, worker_id)
        log.info("consumer settings: %s", redacted(csettings))
        source = stack.enter_context(
            Source(
                csettings,
                cfg.input.topic,
                metrics,
                unreachable_timeout_s=cfg.kafka.unreachable_timeout_s,
                on_revoke=release,
                on_lost=tracker.forget,
            )
        )
        stack.enter_context(stop.on_signals())
        _loop(cfg, source, pipeline, sink, tracker, metrics, report, stop)
        _drain(cfg, source, sink, tracker, metrics)
    report.dead_letters = {
        f"{s.labels['stage']}/{s.labels['reason']}": int(s.value)
        for m in metrics.dead_letters.collect()
        for s in m.samples
        if s.name.endswith("_total")
    }
    report.predictions = int(
        metrics.registry.get_sample_value("stream_scorer_predictions_produced_total") or 0
    )
    return report


def _loop(
    cfg: Config,
    source: Source,
    pipeline: Pipeline,
    sink: Sink,
    tracker: OffsetTracker,
    metrics: Metrics,
    report: WorkerReport,
    stop: StopFlag,
) -> None:
    """The main loop: poll → score → produce → store delivered offsets → health."""
    limit, idle_limit = cfg.worker.max_messages, cfg.worker.idle_timeout_s
    max_wait = cfg.batch.max_wait_ms / 1000.0
    started = last_record = time.monotonic()
    while not stop:
        want = (
            cfg.batch.max_records
            if not limit
            else min(cfg.batch.max_records, limit - report.consumed)
        )
        batch = source.poll_batch(want, max_wait)
        if batch:
            last_record = time.monotonic()
            for msg in batch:
                tracker.track(msg.topic() or "", msg.partition() or 0, msg.offset() or 0)
            report.consumed += len(batch)
            report.batches += 1
            metrics.records_consumed.inc(len(batch))
            metrics.batch_size.observe(len(batch))
            result = pipeline.process(batch)
            t0 = time.perf_counter()
            sink.publish(result.scored, result.dead)
            metrics.observe_stage("produce", time.perf_counter() - t0)
        sink.poll(0)
        sink.raise_errors()
        source.raise_errors()
        source.store(tracker.take_committable())
        metrics.in_flight.set(tracker.pending)
        metrics.last_progress.set(time.time())
        if limit and report.consumed >= limit:
            stop.set("max_messages")
        elif idle_limit and time.monotonic() - last_record > idle_limit:
            stop.set("idle_timeout")
    report.stopped_by = stop.reason
    report.elapsed_s = time.monotonic() - started


def _drain(
    cfg: Config, source: Source, sink: Sink, tracker: OffsetTracker, metrics: Metrics
) -> None:
    """Deliver what is in flight and store it; closing the consumer commits and leaves."""
    remaining = sink.flush(cfg.worker.shutdown_timeout_s)
    sink.raise_errors()
    source.store(tracker.take_committable())
    metrics.in_flight.set(tracker.pending)
    if remaining:
        raise BrokerError(
            f"{remaining} outputs not acknowledged within worker.shutdown_timeout_s = "
            f"{cfg.worker.shutdown_timeout_s}; their records stay uncommitted (redelivered later)"
        )
