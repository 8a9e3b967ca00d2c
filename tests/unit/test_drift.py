"""Drift: bins, PSI, the sliding window and the monitor's gauges (stages.drift, worker.drift)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support import load_raw, ride_config

from stream_scorer.cli import main
from stream_scorer.config import DriftConfig
from stream_scorer.contracts.manifest import FeatureSpec, Manifest
from stream_scorer.errors import ConfigError, ModelError
from stream_scorer.example.rides import RIDE_SCHEMA_PATH
from stream_scorer.example.train import train
from stream_scorer.stages.drift import FLOOR, Bins, bin_index, bins_of, expected_psi, psi
from stream_scorer.worker.drift import (
    DriftMonitor,
    DriftWatch,
    DriftWindow,
    count_batch,
    read_window,
)
from stream_scorer.worker.loop import build_pipeline
from stream_scorer.worker.metrics import Metrics

SPECS = (
    FeatureSpec("x", "x"),
    FeatureSpec("color", "color", "category", ("red", "green", "blue")),
)
REFERENCE: dict[str, Any] = {
    "rows": 1000,
    "features": {
        "x": {"edges": [1.0, 2.0], "shares": [0.3, 0.3, 0.3], "missing": 0.1},
        "color": {"shares": [0.5, 0.25, 0.25], "missing": 0.0},
    },
    "prediction": {"edges": [0.5], "shares": [0.5, 0.5], "missing": 0.0},
}


def _bins() -> Bins:
    bins = bins_of(REFERENCE, SPECS)
    assert bins is not None
    return bins


@pytest.mark.parametrize(
    ("values", "edges", "expected"),
    [
        ([0.5, 1.0, 1.5, 2.0, 9.0], [1.0, 2.0], [0, 1, 1, 2, 2]),  # an edge belongs to the right
        ([-1e30, 1e30], [0.0], [0, 1]),  # outer bins are open
        ([3.0], [], [0]),  # no edges: one bin
    ],
)
def test_bin_index_counts_the_edges_at_or_below(
    values: list[float], edges: list[float], expected: list[int]
) -> None:
    assert bin_index(values, edges).tolist() == expected


@pytest.mark.parametrize(
    ("reference", "counts", "expected"),
    [
        ([0.5, 0.5], [50, 50], 0.0),  # the same distribution
        # (0.8 - 0.5) ln(0.8/0.5) + (0.2 - 0.5) ln(0.2/0.5)
        ([0.5, 0.5], [80, 20], 0.3 * math.log(1.6) - 0.3 * math.log(0.4)),
        # an emptied bin: the floor, not infinity
        (
            [0.5, 0.5],
            [100, 0],
            (1 - 0.5) * math.log(1 / 0.5) + (FLOOR - 0.5) * math.log(FLOOR / 0.5),
        ),
        # a reference share of 0 meeting live values: floored too
        ([1.0, 0.0], [90, 10], (0.9 - 1) * math.log(0.9) + (0.1 - FLOOR) * math.log(0.1 / FLOOR)),
    ],
)
def test_psi_with_the_fixed_floor(
    reference: list[float], counts: list[int], expected: float
) -> None:
    assert float(psi(np.array(reference), np.array(counts))) == pytest.approx(expected)


def test_psi_is_symmetric_and_nan_for_an_empty_window() -> None:
    a, b = np.array([0.2, 0.3, 0.5]), np.array([0.4, 0.4, 0.2])
    assert float(psi(a, b * 100)) == pytest.approx(float(psi(b, a * 1000)))
    assert math.isnan(float(psi(a, np.zeros(3))))
    rows = psi(np.array([a, b]), np.array([[0, 0, 0], [40, 40, 20]]))
    assert math.isnan(rows[0]) and rows[1] == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("bins", "rows", "window", "expected"),
    [(10, 100_000, 100, 0.09009), (10, 100_000, 1000, 0.00909), (10, 100_000, 10_000, 0.00099),
     (1, 1000, 1000, 0.0), (10, 1000, 0, 0.0)],
)  # fmt: skip
def test_expected_psi_matches_the_measured_table(
    bins: int, rows: int, window: int, expected: float
) -> None:
    assert expected_psi(bins, rows, window) == pytest.approx(expected, abs=1e-5)


def test_no_drift_psi_of_a_sampled_window_is_near_the_expected_noise() -> None:
    rng = np.random.default_rng(3)
    edges = np.quantile(rng.normal(size=100_000), np.linspace(0, 1, 11)[1:-1])
    ref = np.full(10, 0.1)
    means = [
        float(psi(ref, np.bincount(bin_index(rng.normal(size=1000), edges), minlength=10)))
        for _ in range(200)
    ]
    assert np.mean(means) == pytest.approx(expected_psi(10, 100_000, 1000), rel=0.25)
    shifted = np.bincount(bin_index(rng.normal(0.5, 1, 10_000), edges), minlength=10)
    assert float(psi(ref, shifted)) > 0.2  # half a standard deviation: the note's 0.22


def test_counts_bin_numbers_categories_and_missing_in_one_pass() -> None:
    bins = _bins()
    matrix = np.array(
        [[0.5, 0], [1.0, 1], [2.5, 2], [np.nan, np.nan], [np.inf, 0]], dtype=np.float32
    )
    counts = bins.count(matrix)
    # x: bins [<1, 1..2, >=2] then missing (NaN, inf)
    assert counts[0].tolist() == [1, 1, 1, 2]
    # color: red, green, blue, missing
    assert counts[1].tolist() == [2, 1, 1, 1]
    assert bins.count(np.empty((0, 2), dtype=np.float32)).sum() == 0
    assert bins.count_predictions(np.array([0.1, 0.7, np.nan])).tolist() == [1, 1, 1]


def test_a_model_without_references_has_no_bins_and_a_malformed_one_names_the_field() -> None:
    assert bins_of({}, SPECS) is None
    for broken, where in (
        ({**REFERENCE, "rows": 0}, "rows"),
        ({**REFERENCE, "features": {"x": REFERENCE["features"]["x"]}}, "'color'"),
        (
            {**REFERENCE, "features": {**REFERENCE["features"], "color": {"shares": [1.0]}}},
            "features.color: 1 shares for 3 bins",
        ),
        (
            {**REFERENCE, "features": {**REFERENCE["features"], "x": {"edges": [2, 1],
                                                                       "shares": [1, 0, 0]}}},
            "ascending",
        ),
        ({**REFERENCE, "prediction": None}, "prediction"),
    ):  # fmt: skip
        with pytest.raises(ModelError, match=where):
            bins_of(broken, SPECS)


def _counts(x: int) -> np.ndarray:
    return np.array([[x, 0], [0, 0]], dtype=np.int64)


def test_the_window_slides_by_events_without_keeping_rows() -> None:
    w = DriftWindow((2, 2), 2, events=100, seconds=0)
    for i in range(10):  # ten batches of 30 events, each counted in slot (0, 0)
        w.add(_counts(30), np.array([30, 0]), 30, now=float(i))
    # the oldest batches drop once the others still hold 100 events: 4 batches remain
    assert w.events == 120 and w.counts[0, 0] == 120 and w.slots == 4
    assert w.fill(10.0) == 1.0
    w.add(_counts(0), np.array([0, 0]), 0, now=11.0)  # an empty batch changes nothing
    assert w.events == 120


def test_small_batches_are_merged_into_slots() -> None:
    w = DriftWindow((2, 2), 2, events=1000, seconds=0)
    for i in range(500):  # 500 batches of 4: slots of at least 1000 / 50 events
        w.add(_counts(4), np.array([4, 0]), 4, now=float(i))
    assert w.slots <= 51 and w.events == 1000 + w.events % 20


def test_the_window_slides_by_time() -> None:
    w = DriftWindow((2, 2), 2, events=1, seconds=10.0)
    w.add(_counts(5), np.array([5, 0]), 5, now=0.0)
    w.add(_counts(7), np.array([7, 0]), 7, now=6.0)
    assert w.events == 12 and w.fill(6.0) == pytest.approx(0.6)
    w.slide(12.0)  # the first batch is older than 10 s
    assert w.events == 7 and w.counts[0, 0] == 7
    w.slide(30.0)
    assert w.events == 0 and w.fill(30.0) == 0.0


def test_read_window_gives_nan_below_min_events_and_the_missing_share() -> None:
    bins = _bins()
    w = DriftWindow((2, bins.stride), 3, events=1000, seconds=0)
    matrix = np.array([[0.5, 0]] * 9 + [[np.nan, 0]], dtype=np.float32)
    w.add(bins.count(matrix), bins.count_predictions(np.zeros(10)), 10, now=0.0)
    early = read_window(bins, w, min_events=20, now=0.0)
    assert math.isnan(early.psi["x"]) and math.isnan(early.prediction_psi)
    assert early.missing == {"x": pytest.approx(0.1), "color": 0.0}
    ready = read_window(bins, w, min_events=10, now=0.0)
    assert ready.psi["x"] > 1 and ready.psi["color"] > 0.3 and ready.prediction_psi > 0.3
    assert ready.events == 10 and ready.fill == pytest.approx(0.01)


def _manifest(version: str, reference: dict[str, Any]) -> Manifest:
    return Manifest(
        model_version=version,
        model_file="model.ubj",
        model_sha256="0" * 64,
        objective="reg:squarederror",
        features=SPECS,
        xgboost_version="3",
        reference=reference,
    )


def _sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.prometheus.get_sample_value(name, labels)
    return math.nan if value is None else value


def test_the_monitor_exports_only_every_interval_and_follows_versions(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    metrics = Metrics()
    settings = DriftConfig(window_events=100, min_events=10, export_interval_s=5, threshold=0.2)
    watch = DriftWatch("rides", settings, metrics, clock=lambda: now[0])
    rng = np.random.default_rng(1)

    def batch(shift: float) -> tuple[np.ndarray, np.ndarray]:
        x = rng.choice([0.5, 1.5, 2.5, np.nan], size=50, p=[0.3, 0.3, 0.3, 0.1]) + shift
        color = rng.choice([0, 1, 2], size=50, p=[0.5, 0.25, 0.25])
        return np.column_stack([x, color]).astype(np.float32), rng.choice([0.2, 0.8], size=50)

    caplog.set_level(logging.INFO, "stream_scorer.worker.drift")
    v1 = _manifest("v1", REFERENCE)
    watch.observe(v1, *batch(0.0))
    labels = {"model": "rides", "version": "v1"}
    assert math.isnan(_sample(metrics, "stream_scorer_drift_window_events", **labels))  # not yet
    assert "PSI is about 0.0" in caplog.text  # the no-drift noise stated at start
    now[0] = 5.0
    watch.observe(v1, *batch(0.0))
    assert _sample(metrics, "stream_scorer_drift_window_events", **labels) == 100
    assert _sample(metrics, "stream_scorer_drift_psi", **labels, feature="x") < 0.1
    now[0] = 10.0
    for _ in range(2):
        watch.observe(v1, *batch(1.0))  # every x one bin up
    # exported at the first shifted batch (half the window shifted); the next export is due at 15
    now[0] = 15.0
    watch.tick()
    assert _sample(metrics, "stream_scorer_drift_psi", **labels, feature="x") > 0.2
    assert _sample(metrics, "stream_scorer_drift_psi", **labels, feature="color") < 0.1
    assert "feature x PSI" in caplog.text and "feature color PSI" not in caplog.text
    assert _sample(metrics, "stream_scorer_drift_missing_share", **labels, feature="x") > 0
    # a new version: its own window; the old version's series are gone
    watch.observe(_manifest("v2", REFERENCE), *batch(0.0))
    assert math.isnan(_sample(metrics, "stream_scorer_drift_psi", **labels, feature="x"))
    # a version without references: no drift, said once
    caplog.clear()
    for _ in range(3):
        watch.observe(_manifest("v3", {}), *batch(0.0))
    assert caplog.text.count("has no reference bins") == 1 and watch.monitor is None


def test_ignored_features_have_no_series(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    settings = DriftConfig(min_events=1, ignore=("color", "nope"))
    monitor = DriftMonitor("m", "v", _bins(), settings, metrics)
    monitor.observe(np.full((5, 2), 9, np.float32), np.zeros(5))  # x and color far off
    monitor.export()
    features = {s.labels["feature"] for m in metrics.drift_psi.collect() for s in m.samples}
    assert features == {"x"}
    assert "drift.ignore names nope" in caplog.text
    assert "feature color" not in caplog.text and "feature x PSI" in caplog.text


def test_drift_off_builds_no_monitor() -> None:
    watch = DriftWatch("m", DriftConfig(enabled=False), Metrics())
    watch.observe(_manifest("v1", REFERENCE), np.zeros((3, 2), np.float32), np.zeros(3))
    assert watch.monitor is None


def test_series_per_model_are_bounded_by_the_manifest() -> None:
    metrics = Metrics()
    monitor = DriftMonitor("m", "v", _bins(), DriftConfig(min_events=1), metrics)
    monitor.observe(np.zeros((5, 2), np.float32), np.zeros(5))
    monitor.export()
    features = {s.labels["feature"] for m in metrics.drift_psi.collect() for s in m.samples}
    assert features == {"x", "color"}
    monitor.close()
    assert not [s for m in metrics.drift_psi.collect() for s in m.samples]


def test_min_events_above_the_window_is_refused_naming_the_key(tmp_path: Path) -> None:
    raw = ride_config(tmp_path, drift={"window_events": 500, "min_events": 1000})
    with pytest.raises(ConfigError, match=r"drift\.min_events: must be at most"):
        load_raw(tmp_path, raw)
    raw = ride_config(tmp_path, drift={"window_s": 60, "min_events": 1000, "window_events": 10})
    assert load_raw(tmp_path, raw).drift.window_s == 60  # a time window: min_events alone


def test_model_check_says_whether_the_model_has_reference_bins(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "rides"
    manifest = train(model, rows=3000, n_estimators=5, max_depth=3)
    rows = manifest.reference["rows"]
    assert main(["model", "check", str(model), "--schema", str(RIDE_SCHEMA_PATH)]) == 0
    assert f"reference bins of {rows} rows for 9 features and the predictions" in (
        capsys.readouterr().out
    )
    body = json.loads((model / "manifest.json").read_text())
    del body["reference"]
    (model / "manifest.json").write_text(json.dumps(body))
    assert main(["model", "check", str(model), "--schema", str(RIDE_SCHEMA_PATH)]) == 0
    assert "no reference bins (scored without drift" in capsys.readouterr().out
    body["reference"] = {**manifest.reference, "rows": 0}
    (model / "manifest.json").write_text(json.dumps(body))
    with pytest.raises(ModelError, match="rows"):  # a malformed reference: the worker refuses it
        build_pipeline(load_raw(tmp_path, ride_config(tmp_path, model={"path": str(model)})),
                       Metrics())  # fmt: skip


def test_a_float32_matrix_is_binned_as_the_reference_was_in_float64() -> None:
    edge = 0.7  # float32(0.7) is just below 0.7: compared in float32, it would reach the edge
    reference = {
        "rows": 10,
        "features": {"x": {"edges": [edge], "shares": [0.5, 0.5], "missing": 0.0}},
        "prediction": {"edges": [], "shares": [1.0], "missing": 0.0},
    }
    bins = bins_of(reference, (FeatureSpec("x", "x"),))
    assert bins is not None
    values = np.array([[np.float32(edge)], [np.nextafter(np.float32(edge), np.float32(1))]])
    as_packed = bin_index(values[:, 0].astype(np.float64), [edge]).tolist()
    assert as_packed == [0, 1]
    assert bins.count(values.astype(np.float32))[0].tolist() == [1, 1, 0]
    assert bins.count(values.astype(np.float64))[0].tolist() == [1, 1, 0]


def test_the_compiled_counts_are_the_numpy_counts() -> None:
    rng = np.random.default_rng(4)
    x = rng.choice([0.5, 1.0, 1.5, 2.0, 3.0, np.nan, np.inf, -np.inf], size=2000)
    color = rng.choice([0.0, 1.0, 2.0, 7.0, -1.0, np.nan], size=2000)
    matrix = np.column_stack([x, color]).astype(np.float32)
    bins = _bins()
    assert count_batch(bins, matrix).tolist() == bins.count(matrix).tolist()
    assert count_batch(bins, matrix[::3]).tolist() == bins.count(matrix[::3]).tolist()  # strided
