"""Each name says what it is, and one thing (issue "layers": names and stale text)."""

import dataclasses

from prometheus_client import CollectorRegistry

from stream_scorer.fast.path import FastColumns
from stream_scorer.model.mlflow import MlflowRegistry
from stream_scorer.stages.pipeline import ColumnBuilder
from stream_scorer.stages.records import Scored
from stream_scorer.worker.delivery import ProducerEvents
from stream_scorer.worker.metrics import Metrics


def test_scored_holds_the_encoded_prediction_records() -> None:
    assert [f.name for f in dataclasses.fields(Scored)] == [
        "messages",
        "encoded",
        "event_ms",
        "versions",  # a rollout's per-record versions (None: the batch's one version)
    ]


def test_the_fast_path_is_a_column_builder() -> None:
    builder: type[ColumnBuilder] = FastColumns  # mypy checks the protocol
    assert builder.run.__doc__


def test_registry_means_the_schema_registry_only() -> None:
    metrics = Metrics()
    assert isinstance(metrics.prometheus, CollectorRegistry)
    assert not hasattr(metrics, "registry")
    mlflow = MlflowRegistry("http://mlflow:5000")
    assert mlflow.model("m").model_registry is mlflow


def test_the_producers_events_are_its_logger_and_error_callback() -> None:
    events = ProducerEvents()
    assert events.callbacks() == {"logger": events, "error_cb": events.on_error}
