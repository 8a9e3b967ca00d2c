"""Prometheus metrics of one worker process.

Every metric is listed, with its meaning, in README.md ("Metrics"). Each worker owns its
registry and serves it on ``metrics.port``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from contextlib import suppress
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

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


class Metrics:
    """The worker's metrics, registered in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        """Create and register every metric."""
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
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
            "Time per batch spent in each stage (decode, features, predict, encode, produce).",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.consumer_lag = Gauge(
            "stream_scorer_consumer_lag_records",
            "Records behind the high watermark per assigned partition (librdkafka statistics).",
            ["topic", "partition"],
            registry=r,
        )
        self.assigned_partitions = Gauge(
            "stream_scorer_assigned_partitions", "Partitions assigned to this worker.", registry=r
        )
        self.in_flight = Gauge(
            "stream_scorer_in_flight_records",
            "Records consumed whose output the broker has not acknowledged yet.",
            registry=r,
        )
        self.last_progress = Gauge(
            "stream_scorer_last_progress_timestamp_seconds",
            "Unix time of the main loop's last completed iteration.",
            registry=r,
        )
        self.model_info = Gauge(
            "stream_scorer_model_info", "The loaded model (value 1).", ["model_version"], registry=r
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

    def observe_stage(self, stage: str, seconds: float) -> None:
        """Record one batch's time in ``stage``."""
        self.stage_seconds.labels(stage).observe(seconds)

    def update_lag(self, lags: Mapping[tuple[str, int], int]) -> None:
        """Set the lag gauge from parsed statistics."""
        for (topic, partition), lag in lags.items():
            self.consumer_lag.labels(topic, str(partition)).set(lag)

    def forget_partitions(self, partitions: list[tuple[str, int]]) -> None:
        """Drop the lag series of partitions this worker no longer owns."""
        for topic, partition in partitions:
            with suppress(KeyError):
                self.consumer_lag.remove(topic, str(partition))

    def serve(self, port: int, host: str) -> Any:
        """Serve ``/metrics`` on ``host:port``; returns the server (call ``shutdown()``)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server


def lag_from_stats(stats_json: str) -> dict[tuple[str, int], int]:
    """Extract per-partition consumer lag from a librdkafka statistics JSON document.

    Only partitions this consumer fetches (``fetch_state`` active) with a known lag count;
    librdkafka reports -1 while it does not know the committed offset or high watermark.
    """
    stats = json.loads(stats_json)
    out: dict[tuple[str, int], int] = {}
    for topic, tdata in stats.get("topics", {}).items():
        for pid, pdata in tdata.get("partitions", {}).items():
            partition = int(pid)
            if partition < 0 or pdata.get("fetch_state") in (None, "none", "stopped"):
                continue
            lag = int(pdata.get("consumer_lag", -1))
            if lag >= 0:
                out[(topic, partition)] = lag
    return out
