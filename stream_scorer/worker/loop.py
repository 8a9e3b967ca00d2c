"""The worker: wire the stages together and run the main loop.

poll a batch → decode/features/score/encode (``Pipeline``) → deliver (``delivery.py``: produce
and store acknowledged offsets, or one transaction per batch) → health, until a signal, a limit
or an error stops it. Then: drain, commit, leave the group.
"""

from __future__ import annotations

import gc
import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass, field

from confluent_kafka import Producer

from stream_scorer.config import (
    EXACTLY_ONCE,
    Config,
    consumer_settings,
    producer_settings,
    redacted,
    worker_identity,
)
from stream_scorer.errors import BrokerError, ConfigError, SchemaError
from stream_scorer.fast.path import build_fast_path
from stream_scorer.logs import set_context as set_log_context
from stream_scorer.stages.decode import Decoder, load_schema
from stream_scorer.stages.encode import PredictionEncoder
from stream_scorer.stages.features import FeatureBuilder, check_schema
from stream_scorer.stages.fields import resolve
from stream_scorer.stages.pipeline import Pipeline
from stream_scorer.stages.score import Scorer
from stream_scorer.worker.delivery import AtLeastOnce, Delivery, ExactlyOnce
from stream_scorer.worker.flow import BatchSizer, PoisonGuard, StopFlag
from stream_scorer.worker.health import Monitor
from stream_scorer.worker.metrics import Metrics
from stream_scorer.worker.offsets import OffsetTracker
from stream_scorer.worker.sink import Sink, SinkContext
from stream_scorer.worker.source import Source

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


def build_pipeline(cfg: Config, metrics: Metrics) -> tuple[Pipeline, Scorer]:
    """Load the schemas and the model and check they fit each other."""
    scorer = Scorer(cfg.model.path, nthread=cfg.model.nthread, threshold=cfg.model.threshold)
    input_schema = load_schema(cfg.input.schema)
    check_schema(scorer.manifest.features, input_schema)
    # every category feature's series exists from the start, at 0
    metrics.count_unseen({f.name: 0 for f in scorer.manifest.features if f.transform == "category"})
    for key, name in (
        ("input.id_field", cfg.input.id_field),
        ("input.event_time_field", cfg.input.event_time_field),
    ):
        if name:
            try:
                resolve(input_schema, name)
            except SchemaError as exc:
                raise ConfigError(key, f"{exc} (input schema {cfg.input.schema})") from None
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


def _delivery(
    cfg: Config,
    worker_id: str,
    ctx: SinkContext,
    source: Source,
    tracker: OffsetTracker,
    metrics: Metrics,
) -> Delivery:
    """Create the producer side of the configured delivery mode."""
    psettings = producer_settings(cfg, worker_id)
    log.info("producer settings: %s", redacted(psettings))
    if cfg.delivery.mode == EXACTLY_ONCE:
        return ExactlyOnce(
            lambda: Producer(psettings),
            ctx,
            source,
            tracker,
            metrics,
            timeout_s=cfg.delivery.transaction_timeout_s,
        )
    return AtLeastOnce(
        Sink(Producer(psettings), ctx, tracker, metrics),
        source,
        tracker,
        max_in_flight=cfg.batch.max_in_flight,
        flush_timeout_s=cfg.worker.shutdown_timeout_s,
    )


def run_worker(cfg: Config, stop: StopFlag | None = None) -> WorkerReport:
    """Run one worker until stopped; return what it did.

    Raises:
        StreamScorerError: a configuration, model, broker or delivery failure (exit non-zero).
    """
    worker_id = worker_identity(cfg)
    report = WorkerReport(worker_id)
    set_log_context(worker_id=worker_id, group=cfg.input.group_id)
    stop = stop if stop is not None else StopFlag()
    metrics = Metrics()
    tracker = OffsetTracker()
    with ExitStack() as stack:
        stack.enter_context(stop.on_signals())  # first: a SIGTERM during start-up stops cleanly
        pipeline, scorer = build_pipeline(cfg, metrics)
        metrics.model_info.labels(scorer.model_version).set(1)
        monitor = stack.enter_context(Monitor(cfg, metrics, scorer.model_version))
        ctx = SinkContext(
            cfg.output.topic,
            cfg.dead_letter.topic,
            cfg.input.group_id,
            worker_id,
            scorer.model_version,
            cfg.kafka.unreachable_timeout_s,
        )
        csettings = consumer_settings(cfg, worker_id)
        log.info("consumer settings: %s", redacted(csettings))
        source = stack.enter_context(
            Source(
                csettings,
                cfg.input.topic,
                metrics,
                unreachable_timeout_s=cfg.kafka.unreachable_timeout_s,
                on_revoke=lambda parts: delivery.on_revoke(parts),
                on_lost=lambda parts: delivery.on_lost(parts),
            )
        )
        delivery = _delivery(cfg, worker_id, ctx, source, tracker, metrics)
        monitor.watch(source)
        # the ~130k objects of start-up (xgboost, numba, numpy, the clients) live as long as
        # the worker: frozen, the collector's full passes skip them (each took ~50 ms and
        # showed as periodic latency spikes under load)
        gc.collect()
        gc.freeze()
        _loop(cfg, source, pipeline, delivery, tracker, metrics, report, stop)
        remaining = delivery.drain()
        metrics.in_flight.set(tracker.pending)
        if remaining:
            raise BrokerError(
                f"{remaining} outputs not acknowledged within worker.shutdown_timeout_s = "
                f"{cfg.worker.shutdown_timeout_s}; their records stay uncommitted (redelivered)"
            )
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
    delivery: Delivery,
    tracker: OffsetTracker,
    metrics: Metrics,
    report: WorkerReport,
    stop: StopFlag,
) -> None:
    """The main loop: poll → score → deliver (→ offsets) → health."""
    limit, idle_limit = cfg.worker.max_messages, cfg.worker.idle_timeout_s
    max_wait = cfg.batch.max_wait_ms / 1000.0
    sizer = BatchSizer(cfg.batch.max_records, cfg.batch.max_processing_s)
    poison = PoisonGuard(
        cfg.dead_letter.max_ratio, cfg.dead_letter.window, cfg.dead_letter.max_consecutive
    )
    started = last_record = time.monotonic()
    while not stop:
        want = sizer.size if not limit else min(sizer.size, limit - report.consumed)
        batch = source.poll_batch(want, max_wait)
        if batch:
            t0 = last_record = time.monotonic()
            ticket = tracker.track(batch)
            metrics.records_consumed.inc(len(batch))
            metrics.batch_size.observe(len(batch))
            result = pipeline.process(batch)
            if poison.enabled:
                dead = {id(d.message) for d in result.dead}
                poison.observe([id(m) in dead for m in batch])
            t1 = time.perf_counter()
            delivered = delivery.deliver(ticket, result) is not False  # False: rolled back
            metrics.observe_stage("produce", time.perf_counter() - t1)
            if delivered:
                report.consumed += len(batch)
                report.batches += 1
                metrics.observe_latency(result.scored.event_ms)
                metrics.count_unseen(result.unseen)
            metrics.batch_limit.set(sizer.observe(len(batch), time.monotonic() - t0))
        delivery.service()
        source.raise_errors()
        metrics.in_flight.set(tracker.pending)
        metrics.paused.set(delivery.paused)
        metrics.last_progress.set(time.time())
        if limit and report.consumed >= limit:
            stop.set("max_messages")
        elif idle_limit and time.monotonic() - last_record > idle_limit:
            stop.set("idle_timeout")
    report.stopped_by = stop.reason
    report.elapsed_s = time.monotonic() - started
