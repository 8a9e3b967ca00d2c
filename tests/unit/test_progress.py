"""The worker's progress line and its first-unseen-category lines (``worker/progress.py``)."""

from __future__ import annotations

import logging

import pytest

from stream_scorer.worker.metrics import Metrics
from stream_scorer.worker.progress import Progress, progress_line


def test_the_line_says_rate_dead_letters_by_reason_lag_and_model() -> None:
    line = progress_line(3000, 30.0, {"truncated": 2, "non_finite": 1, "empty": 0}, 120, "v7")
    assert line == (
        "progress: 3000 records in 30 s (100/s), dead letters 3 (non_finite 1, truncated 2), "
        "lag 120 records, model v7"
    )
    assert progress_line(0, 30.0, {}, None, "v7").endswith(
        "(0/s), dead letters 0, lag unknown, model v7"
    )


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "stream_scorer.worker.progress"]


def test_a_line_per_interval_counts_what_happened_since_the_previous(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="stream_scorer.worker.progress")
    metrics = Metrics()
    metrics.records_consumed.inc(500)  # before the worker's progress starts: not counted
    progress = Progress(metrics, interval_s=10.0, now=100.0)
    metrics.records_consumed.inc(2000)
    metrics.dead_letters.labels("decode", "truncated").inc(4)
    metrics.dead_letters.labels("features", "non_finite").inc(1)
    metrics.consumer_lag.labels("in", "0").set(7)
    metrics.consumer_lag.labels("in", "1").set(3)
    progress.tick("v1", now=105.0)  # within the interval: nothing
    assert _lines(caplog) == []
    progress.tick("v1", now=110.0)
    metrics.records_consumed.inc(1000)
    metrics.dead_letters.labels("decode", "truncated").inc(1)
    progress.tick("v2", now=120.0)
    assert _lines(caplog) == [
        "progress: 2000 records in 10 s (200/s), dead letters 5 (non_finite 1, truncated 4), "
        "lag 10 records, model v1",
        "progress: 1000 records in 10 s (100/s), dead letters 1 (truncated 1), "
        "lag 10 records, model v2",
    ]


def test_interval_zero_logs_no_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="stream_scorer.worker.progress")
    progress = Progress(Metrics(), interval_s=0, now=0.0)
    progress.tick("v1", now=1e9)
    assert _lines(caplog) == []


def test_the_first_unseen_value_of_each_feature_is_logged_once_then_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="stream_scorer.worker.progress")
    metrics = Metrics()
    progress = Progress(metrics, interval_s=0)
    progress.unseen({"channel": 0, "country": 0}, "v1")  # the series, no value yet
    progress.unseen({"channel": 2}, "v1")
    progress.unseen({"channel": 5, "country": 1}, "v1")
    progress.unseen({"channel": 1, "country": 4}, "v2")
    lines = _lines(caplog)
    assert len(lines) == 2
    assert lines[0].startswith("feature 'channel' met a value none of its categories")
    assert "(2 in this batch, model v1)" in lines[0]
    assert lines[1].startswith("feature 'country' met") and "(1 in this batch" in lines[1]
    count = metrics.prometheus.get_sample_value
    assert count("stream_scorer_unseen_categories_total", {"feature": "channel"}) == 8
    assert count("stream_scorer_unseen_categories_total", {"feature": "country"}) == 5
