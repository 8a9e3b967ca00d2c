"""Prometheus metrics of one worker process.

Every metric is listed, with its meaning, in docs/manual/reference/metrics.md (generated from
this registry). Each worker process owns its Prometheus registry and serves it on its own port
(``stream_scorer.worker.health``), so with ``--workers N`` nothing is counted twice: Prometheus
scrapes each process and sums.
"""

from __future__ import annotations

import threading
import time
from collections import Counter as Counter_
from collections.abc import Iterator, Mapping, Sequence
from contextlib import suppress

import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from stream_scorer.stages.records import Scored

_BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
_STAGE_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
)


#: A shadow's prediction minus its champion's (probabilities, or small regression values).
_DELTA_BUCKETS = (-100, -10, -1, -0.5, -0.1, -0.01, -0.001, 0, 0.001, 0.01, 0.1, 0.5, 1, 10, 100)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


class ConsumerMetrics:
    """What every consuming process serves: lag, stalls, progress and readiness (``Monitor``).

    The scoring worker's ``Metrics`` and the sink's ``StoreMetrics`` extend it, each in its own
    Prometheus registry (``prometheus``).
    """

    def __init__(self, prometheus: CollectorRegistry | None = None) -> None:
        """Create and register the shared metrics (in ``prometheus``, default a new registry)."""
        self.prometheus = prometheus if prometheus is not None else CollectorRegistry()
        r = self.prometheus
        self.consumer_lag = Gauge(
            "stream_scorer_consumer_lag_records",
            "End offset minus committed offset per assigned partition.",
            ["topic", "partition"],
            registry=r,
        )
        self.consumer_lag_seconds = Gauge(
            "stream_scorer_consumer_lag_seconds",
            "Now minus the timestamp of the oldest uncommitted record per assigned partition "
            "(0 without lag).",
            ["topic", "partition"],
            registry=r,
        )
        self.share_backlog = Gauge(
            "stream_scorer_share_backlog_records",
            "Share groups: the partition's end offset minus the offset after the newest record "
            "delivered to this worker (the group's records not yet given to any worker: min "
            "over its workers).",
            ["topic", "partition"],
            registry=r,
        )
        self.partition_stalled = Gauge(
            "stream_scorer_partition_stalled",
            "1 when the partition has lag and its committed offset has not moved for "
            "health.stall_timeout_s, else 0.",
            ["topic", "partition"],
            registry=r,
        )
        self.last_progress = Gauge(
            "stream_scorer_last_progress_timestamp_seconds",
            "Unix time of the main loop's last completed iteration.",
            registry=r,
        )
        self.ready = Gauge("stream_scorer_ready", "1 when /readyz answers 200, else 0.", registry=r)

    def update_partitions(
        self,
        lags: Mapping[tuple[str, int], tuple[int, int, float]],
        stalled: Mapping[tuple[str, int], bool],
    ) -> None:
        """Set the per-partition gauges from ``(committed, lag records, lag seconds)``."""
        for (topic, partition), (_committed, records, seconds) in lags.items():
            labels = (topic, str(partition))
            self.consumer_lag.labels(*labels).set(records)
            self.consumer_lag_seconds.labels(*labels).set(seconds)
            self.partition_stalled.labels(*labels).set(1 if stalled.get((topic, partition)) else 0)

    def update_share_backlog(self, backlog: Mapping[tuple[str, int], int]) -> None:
        """Set ``stream_scorer_share_backlog_records`` per partition (``ShareBacklog.records``)."""
        for (topic, partition), records in backlog.items():
            self.share_backlog.labels(topic, str(partition)).set(records)

    def forget_partitions(self, partitions: list[tuple[str, int]]) -> None:
        """Drop the per-partition series of partitions this worker no longer owns."""
        for topic, partition in partitions:
            for gauge in (self.consumer_lag, self.consumer_lag_seconds, self.partition_stalled):
                with suppress(KeyError):
                    gauge.remove(topic, str(partition))

    def render(self) -> bytes:
        """The Prometheus registry in Prometheus' text exposition format."""
        return generate_latest(self.prometheus)


class Metrics(ConsumerMetrics):
    """The scoring worker's metrics (``run``)."""

    def __init__(self, prometheus: CollectorRegistry | None = None) -> None:
        """Create and register every metric (in ``prometheus``, default a new registry)."""
        super().__init__(prometheus)
        r = self.prometheus
        self.records_consumed = Counter(
            "stream_scorer_records_consumed", "Records consumed from the input topic.", registry=r
        )
        self.predictions = Counter(
            "stream_scorer_predictions_produced",
            "Predictions acknowledged by the broker.",
            registry=r,
        )
        self.dead_letters = Counter(
            "stream_scorer_dead_letters",
            "Dead letters acknowledged by the broker, by stage and reason.",
            ["stage", "reason"],
            registry=r,
        )
        self.dead_letters_stripped = Counter(
            "stream_scorer_dead_letters_stripped",
            "Dead letters written without their key and value because the whole record did not "
            "fit the dead-letter topic (acknowledged; also counted in dead_letters), by stage "
            "and reason.",
            ["stage", "reason"],
            registry=r,
        )
        self.registry_retries = Counter(
            "stream_scorer_registry_retries",
            "Schema Registry requests that failed (unreachable or a server error) and were "
            "retried while a batch waited for a writer schema.",
            registry=r,
        )
        self.registry_waiting = Gauge(
            "stream_scorer_registry_waiting",
            "1 while a batch waits for the Schema Registry (an outage), else 0.",
            registry=r,
        )
        self.unseen_categories = Counter(
            "stream_scorer_unseen_categories",
            "Values of a category feature that are none of its categories, by feature (scored "
            "as missing or dead-lettered, by the feature's unseen policy).",
            ["feature"],
            registry=r,
        )
        self.delivery_errors = Counter(
            "stream_scorer_delivery_errors",
            "Produce requests the broker did not acknowledge (the worker then stops).",
            registry=r,
        )
        self.batch_size = Histogram(
            "stream_scorer_batch_size_records",
            "Records per consumed batch.",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "stream_scorer_stage_duration_seconds",
            "Time per batch spent in each stage (decode, features, predict, encode, produce, "
            "drift).",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.end_to_end_latency = BatchHistogram(
            "stream_scorer_end_to_end_latency_seconds",
            "Time a prediction was produced minus its event time.",
            _LATENCY_BUCKETS,
        )
        r.register(self.end_to_end_latency)
        self.assigned_partitions = Gauge(
            "stream_scorer_assigned_partitions", "Partitions assigned to this worker.", registry=r
        )
        self.in_flight = Gauge(
            "stream_scorer_in_flight_records",
            "Records consumed whose output the broker has not acknowledged yet.",
            registry=r,
        )
        self.model_info = Gauge(
            "stream_scorer_model_info", "The loaded model (value 1).", ["model_version"], registry=r
        )
        self.model_swaps = Counter(
            "stream_scorer_model_swaps",
            "New model versions swapped in between batches (model.refresh_s).",
            registry=r,
        )
        self.model_refused = Counter(
            "stream_scorer_model_refused",
            "New model versions refused (failed to load or to pass their checks); the "
            "previous one kept scoring.",
            registry=r,
        )
        self.rollout_weight = Gauge(
            "stream_scorer_rollout_weight_percent",
            "Percent of keys each model version scores now (a canary, A/B or blue-green "
            "rollout: model rollout; one version: 100), by model entry (the single form: "
            "default) and version.",
            ["model", "model_version"],
            registry=r,
        )
        self.predictions_by_version = Counter(
            "stream_scorer_version_predictions",
            "Predictions of delivered batches, by model entry (the single form: default) and the "
            "model version that made them.",
            ["model", "model_version"],
            registry=r,
        )
        self.rollout_unreadable = Gauge(
            "stream_scorer_rollout_unreadable",
            "1 while the alias's rollout record cannot be read (malformed); the split in force "
            "keeps scoring.",
            registry=r,
        )
        self.rollout_refused = Gauge(
            "stream_scorer_rollout_refused",
            "1 while the rollout asked for is refused (a version failed to load or a check); "
            "the split in force keeps scoring.",
            registry=r,
        )
        self.startup_seconds = Gauge(
            "stream_scorer_startup_seconds",
            "Seconds from the worker's start to when it could score (model loaded, pipeline "
            "warmed up: compiled or loaded from the numba cache); 0 before.",
            registry=r,
        )
        self.first_batch_seconds = Gauge(
            "stream_scorer_first_batch_seconds",
            "Seconds from the worker's start to its first delivered batch; 0 before.",
            registry=r,
        )
        self._born = time.monotonic()
        self.model_loaded_at = Gauge(
            "stream_scorer_model_loaded_timestamp_seconds",
            "Unix time the model now scoring was swapped in (or loaded at start-up).",
            registry=r,
        )

        self.transactions = Counter(
            "stream_scorer_transactions",
            "Exactly-once transactions by outcome (committed, aborted, recreated: the producer "
            "was re-created after an ambiguous error).",
            ["outcome"],
            registry=r,
        )
        self.paused = Gauge(
            "stream_scorer_input_paused",
            "1 while the input partitions are paused because too many outputs await "
            "acknowledgement (at-least-once back-pressure).",
            registry=r,
        )
        self.batch_limit = Gauge(
            "stream_scorer_batch_limit_records",
            "The current batch size limit (shrinks when batches take too long).",
            registry=r,
        )
        # --- per model (``models:``; the single form is the model ``default``) -------------
        self.model_predictions = Counter(
            "stream_scorer_model_predictions_produced",
            "Predictions acknowledged by the broker, by model (models: entries only).",
            ["model"],
            registry=r,
        )
        self.model_stage_seconds = Histogram(
            "stream_scorer_model_stage_duration_seconds",
            "Time per batch each model spent scoring it (predict and encode), by model.",
            ["model"],
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.model_version_info = Gauge(
            "stream_scorer_model_version_info",
            "The version each model entry scores with (value 1), by model, version and role.",
            ["model", "model_version", "role"],
            registry=r,
        )
        self.model_entry_swaps = Counter(
            "stream_scorer_model_entry_swaps",
            "New versions swapped in between batches, by model.",
            ["model"],
            registry=r,
        )
        self.shadow_failed = Gauge(
            "stream_scorer_shadow_failed",
            "1 while a shadow model is failed (did not load, or raised on a batch) and being "
            "retried with backoff; its champion scores on.",
            ["model"],
            registry=r,
        )
        self.shadow_compared = Counter(
            "stream_scorer_shadow_compared_records",
            "Records both a shadow model and its champion scored, by shadow model.",
            ["model"],
            registry=r,
        )
        self.shadow_agreed = Counter(
            "stream_scorer_shadow_agreed_records",
            "Of the records compared, those a classifier shadow labelled as its champion did "
            "(at each one's threshold); agreement rate = agreed / compared.",
            ["model"],
            registry=r,
        )
        self.shadow_delta = BatchHistogram(
            "stream_scorer_shadow_prediction_delta",
            "A shadow model's prediction minus its champion's, per record compared.",
            _DELTA_BUCKETS,
            label="model",
        )
        r.register(self.shadow_delta)
        self.shadow_refused = Counter(
            "stream_scorer_shadow_refused_records",
            "Records a shadow model could not score (no dead letter is written for them).",
            ["model"],
            registry=r,
        )
        # drift (worker.drift): per model version, per feature of its manifest (bounded by the
        # manifest's features); the predictions' PSI is a gauge of its own
        self.drift_psi = Gauge(
            "stream_scorer_drift_psi",
            "PSI of the drift window's values of a feature against the model's reference bins "
            "(NaN until the window holds drift.min_events).",
            ["model", "version", "feature"],
            registry=r,
        )
        self.drift_missing_share = Gauge(
            "stream_scorer_drift_missing_share",
            "Share of the drift window's events whose feature was missing (NaN, or an unseen "
            "category scored as missing).",
            ["model", "version", "feature"],
            registry=r,
        )
        self.drift_prediction_psi = Gauge(
            "stream_scorer_drift_prediction_psi",
            "PSI of the drift window's predictions against the model's reference bins.",
            ["model", "version"],
            registry=r,
        )
        self.drift_expected_psi = Gauge(
            "stream_scorer_drift_expected_psi",
            "The mean PSI of the drift window with no drift at all, (bins - 1) * (1/reference "
            "rows + 1/window events), for the feature with the most bins: the noise floor.",
            ["model", "version"],
            registry=r,
        )
        self.drift_window_events = Gauge(
            "stream_scorer_drift_window_events",
            "Scored events in the drift window.",
            ["model", "version"],
            registry=r,
        )
        self.drift_window_fill = Gauge(
            "stream_scorer_drift_window_fill",
            "How full the drift window is, 0 to 1 (events over drift.window_events, or seconds "
            "covered over drift.window_s).",
            ["model", "version"],
            registry=r,
        )

    def entry_version(self, model: str, role: str, old: str | None, new: str) -> None:
        """Show ``new`` as the version model entry ``model`` scores with (``old``: replaced)."""
        if old is not None:
            with suppress(KeyError):
                self.model_version_info.remove(model, old, role)
            self.model_entry_swaps.labels(model).inc()
        self.model_version_info.labels(model, new, role).set(1)

    def model_swapped(self, old: str | None, new: str) -> None:
        """Show ``new`` as the model in use (``old``: the one it replaced, None at start-up)."""
        if old is not None:
            with suppress(KeyError):
                self.model_info.remove(old)
            self.model_swaps.inc()
        self.model_info.labels(new).set(1)
        self.model_loaded_at.set(time.time())

    def routing(self, model: str, weights: Mapping[str, float]) -> None:
        """Show the percent of keys per version model entry ``model`` scores with now."""
        for metric in self.rollout_weight.collect():
            for sample in metric.samples:
                labels = sample.labels
                if labels["model"] == model and labels["model_version"] not in weights:
                    with suppress(KeyError):
                        self.rollout_weight.remove(model, labels["model_version"])
        for version, percent in weights.items():
            self.rollout_weight.labels(model, version).set(percent)

    def count_versions(self, model: str, scored: Scored, model_version: str) -> None:
        """Add model entry ``model``'s delivered predictions of a batch, per version."""
        if scored.versions is None:
            if scored.messages:
                self.predictions_by_version.labels(model, model_version).inc(len(scored.messages))
            return
        for version, n in Counter_(scored.versions).items():
            self.predictions_by_version.labels(model, version).inc(n)

    def could_score(self) -> None:
        """Record that the worker could score a batch now (``stream_scorer_startup_seconds``)."""
        self.startup_seconds.set(time.monotonic() - self._born)

    def first_batch(self) -> None:
        """Record the first delivered batch (``stream_scorer_first_batch_seconds``)."""
        self.first_batch_seconds.set(time.monotonic() - self._born)

    def observe_stage(self, stage: str, seconds: float) -> None:
        """Record one batch's time in ``stage``."""
        self.stage_seconds.labels(stage).observe(seconds)

    def count_unseen(self, counts: Mapping[str, int]) -> None:
        """Add a batch's unseen categories (``BatchResult.unseen``: per feature)."""
        for feature, n in counts.items():
            self.unseen_categories.labels(feature).inc(n)

    def observe_latency(self, event_ms: Sequence[int], now: float | None = None) -> None:
        """Observe now minus each event time (ms) of the predictions just produced (0: unknown)."""
        now = time.time() if now is None else now
        times = np.array(event_ms, dtype=np.float64).reshape(len(event_ms))
        times = times[times != 0]
        self.end_to_end_latency.observe_many(np.maximum(0.0, now - times / 1000.0))


class StoreMetrics(ConsumerMetrics):
    """The metrics of ``sink postgres`` (``worker.store``), besides the lag and readiness."""

    def __init__(self, prometheus: CollectorRegistry | None = None) -> None:
        """Create and register every metric (in ``prometheus``, default a new registry)."""
        super().__init__(prometheus)
        r = self.prometheus
        self.rows_stored = Counter(
            "stream_scorer_sink_rows_stored",
            "Prediction rows the sink stored (transactions committed).",
            registry=r,
        )
        self.batches = Counter(
            "stream_scorer_sink_batches", "Transactions the sink committed.", registry=r
        )
        self.duplicates = Counter(
            "stream_scorer_sink_duplicates",
            "Predictions whose (input_id, model_version) was already stored (kept once).",
            registry=r,
        )
        self.fenced = Counter(
            "stream_scorer_sink_fenced",
            "Partitions' batches dropped because another member had moved their stored offset.",
            registry=r,
        )
        self.dead_letters = Counter(
            "stream_scorer_sink_dead_letters",
            "Records that are not predictions, acknowledged on store.dead_letter_topic, by "
            "stage and reason.",
            ["stage", "reason"],
            registry=r,
        )
        self.database_retries = Counter(
            "stream_scorer_sink_database_retries",
            "Database calls that failed with an outage and were asked again.",
            registry=r,
        )


class BatchHistogram(Collector):
    """A Prometheus histogram observed a batch at a time (numpy), not value by value.

    The exposition is the same as ``prometheus_client.Histogram``'s (``_bucket``, ``_count``,
    ``_sum``); observing 1,000 values costs one ``searchsorted`` instead of 1,000 locked calls.
    With ``label``, one histogram per value of that label (``observe_many(values, value)``).
    """

    def __init__(
        self, name: str, documentation: str, buckets: Sequence[float], label: str | None = None
    ) -> None:
        """Create an empty histogram with ``buckets`` upper bounds (``+Inf`` is added)."""
        self._name = name
        self._doc = documentation
        self._label = label
        self._bounds = np.asarray(sorted(buckets), dtype=np.float64)
        #: label value ("" without a label) -> (bucket counts, sum)
        self._series: dict[str, tuple[npt.NDArray[np.int64], list[float]]] = {}
        if label is None:
            self._series[""] = (np.zeros(len(self._bounds) + 1, dtype=np.int64), [0.0])
        self._lock = threading.Lock()

    def observe_many(self, values: npt.NDArray[np.float64], label: str = "") -> None:
        """Observe every value of ``values`` (in the series of ``label``, with a label)."""
        if values.size == 0:
            return
        slots = np.searchsorted(self._bounds, values, side="left")  # the first bound >= value
        counts = np.bincount(slots, minlength=len(self._bounds) + 1)
        with self._lock:
            series = self._series.get(label)
            if series is None:
                zero = np.zeros(len(self._bounds) + 1, dtype=np.int64)
                series = self._series[label] = (zero, [0.0])
            series[0][:] += counts
            series[1][0] += float(values.sum())

    def collect(self) -> Iterator[Metric]:
        """Yield the histogram family (cumulative buckets)."""
        with self._lock:
            copies = [(k, c.copy(), t[0]) for k, (c, t) in self._series.items()]
        les = [repr(b) for b in self._bounds.tolist()]  # as prometheus_client writes `le`
        family = HistogramMetricFamily(
            self._name, self._doc, labels=None if self._label is None else [self._label]
        )
        for value, counts, total in copies:
            cumulative = np.cumsum(counts).tolist()
            family.add_metric(
                [] if self._label is None else [value],
                [*zip(les, cumulative[:-1], strict=True), ("+Inf", cumulative[-1])],
                total,
            )
        yield family

    def describe(self) -> Iterator[Metric]:
        """Yield the family without samples (the Prometheus registry checks names with it)."""
        yield HistogramMetricFamily(self._name, self._doc)
