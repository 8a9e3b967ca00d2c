"""``model compare``: two models on the same records, against numbers computed by hand."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xgboost as xgb

from stream_scorer.batch.compare import compare
from stream_scorer.batch.score import load_batch_scorer, open_readers
from stream_scorer.contracts.manifest import read_manifest, write_manifest
from stream_scorer.example.rides import FEATURES, generate_rides
from stream_scorer.example.train import train
from stream_scorer.model.pack import reference_of
from stream_scorer.model.store import ModelStore, promote
from stream_scorer.stages.drift import population_stability, reference_counts
from stream_scorer.stages.features import FeatureBuilder

ROOT = Path(__file__).parents[2]
CONFIG = ROOT / "deploy" / "config" / "rides.yaml"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    out = {}
    settings: dict[str, dict[str, Any]] = {
        "a": {"n_estimators": 5, "seed": 1},
        "b": {"n_estimators": 12, "seed": 2},
        "ca": {"n_estimators": 5, "seed": 1, "objective": "binary:logistic"},
        "cb": {"n_estimators": 12, "seed": 2, "objective": "binary:logistic", "threshold": 0.3},
    }
    for name, kwargs in settings.items():
        train(root / name, rows=2000, **kwargs)
        # the example's training packs reference bins; these start without (tests add them)
        manifest = read_manifest(root / name)
        write_manifest(root / name, dataclasses.replace(manifest, reference={}))
        out[name] = root / name
    return out


def _rides_file(folder: Path, scale: float = 1.0) -> tuple[Path, list[dict[str, object]]]:
    from stream_scorer.example.rides import arrow_schema

    rides = generate_rides(700, seed=4)
    for r in rides:
        r["distance_km"] = float(r["distance_km"]) * scale
    rides[5]["distance_km"] = float("nan")  # dead-lettered by both
    path = folder / f"rides-{scale}.parquet"
    pq.write_table(pa.Table.from_pylist(rides, schema=arrow_schema()), path, row_group_size=256)
    return path, rides


def _by_hand(model: Path, rides: list[dict[str, object]]) -> np.ndarray:
    matrix, rejected = FeatureBuilder(FEATURES).build(rides)
    keep = [i for i in range(len(rides)) if i not in {r.index for r in rejected}]
    booster = xgb.Booster(model_file=str(model / "model.ubj"))
    return np.asarray(booster.inplace_predict(matrix[keep]), dtype=np.float64)


def _config(model: Path) -> object:
    """The example's configuration (its own model is neither of the two compared)."""
    from stream_scorer.config import load_config

    return load_config(CONFIG, environ={"STREAM_SCORER_MODEL__PATH": str(model)})


def test_regression_deltas_and_the_worst_rows(tmp_path: Path, models: dict[str, Path]) -> None:
    cfg = _config(models["a"])
    path, rides = _rides_file(tmp_path)
    a = load_batch_scorer(cfg, str(models["a"]))  # type: ignore[arg-type]
    b = load_batch_scorer(cfg, str(models["b"]))  # type: ignore[arg-type]
    out = tmp_path / "worst.parquet"
    report = compare(
        a, b, open_readers(a, [str(path)]), names=("a", "b"), out=out, top=10, batch_size=300
    )
    delta = _by_hand(models["b"], rides) - _by_hand(models["a"], rides)
    assert report.records == 700
    assert report.compared == 699
    assert (report.dead_letters_a, report.dead_letters_b) == (1, 1)
    assert report.agreement is None  # not classifiers
    assert report.delta["q50"] == pytest.approx(float(np.quantile(delta, 0.5)), abs=1e-9)
    assert report.delta["q99"] == pytest.approx(float(np.quantile(delta, 0.99)), abs=1e-9)
    assert report.delta["q100"] == pytest.approx(float(delta.max()), abs=1e-9)
    assert report.delta["mean_abs"] == pytest.approx(float(np.abs(delta).mean()), rel=1e-9)
    assert report.drift == {"a": None, "b": None}  # no reference bins in these manifests
    worst = pq.read_table(out).to_pylist()
    assert len(worst) == 10
    ids = [str(r["ride_id"]) for i, r in enumerate(rides) if i != 5]
    expected = [ids[i] for i in np.argsort(-np.abs(delta), kind="stable")[:10]]
    assert [w["input_id"] for w in worst] == expected
    assert all(w["delta"] == w["prediction_b"] - w["prediction_a"] for w in worst)


def test_classifiers_agreement_at_each_threshold_and_drift(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    cfg = _config(models["a"])
    path, rides = _rides_file(tmp_path)
    # model B carries reference bins from the same distribution
    booster = xgb.Booster(model_file=str(models["cb"] / "model.ubj"))
    manifest = read_manifest(models["cb"])
    reference = reference_of(booster, FEATURES, generate_rides(3000, seed=9))
    write_manifest(models["cb"], dataclasses.replace(manifest, reference=reference))
    a = load_batch_scorer(cfg, str(models["ca"]))  # type: ignore[arg-type]
    b = load_batch_scorer(cfg, str(models["cb"]))  # type: ignore[arg-type]
    report = compare(a, b, open_readers(a, [str(path)]), names=("a", "b"))
    pa_, pb = _by_hand(models["ca"], rides), _by_hand(models["cb"], rides)
    same = (pa_ >= 0.5) == (pb >= 0.3)
    assert report.agreement == pytest.approx(float(same.mean()))
    assert report.drift["a"] is None
    assert report.drift["b"] is not None and report.drift["b"] < 0.1
    shifted, _ = _rides_file(tmp_path, scale=4.0)
    far = compare(a, b, open_readers(a, [str(shifted)]), names=("a", "b"))
    assert far.drift["b"] is not None and far.drift["b"] > 0.25 > report.drift["b"]


def test_population_stability_by_hand() -> None:
    reference = {"edges": [1.0, 2.0], "shares": [0.5, 0.25, 0.25], "missing": 0.0}
    counts = reference_counts(reference, np.array([0.5, 1.5, 1.7, 2.5, np.nan]))
    assert counts.tolist() == [1, 2, 1, 1]
    live = np.array([0.2, 0.4, 0.2, 0.2])
    ref = np.array([0.5, 0.25, 0.25, 1e-4])
    expected = float(np.sum((live - ref) * np.log(live / ref)))
    assert population_stability(reference, counts) == pytest.approx(expected)
    assert population_stability(reference, np.array([50, 25, 25, 0])) == pytest.approx(0.0)


def test_the_command_prints_the_report(tmp_path: Path, models: dict[str, Path]) -> None:
    path, _ = _rides_file(tmp_path)
    env = {**os.environ, "STREAM_SCORER_MODEL__PATH": str(models["a"])}
    # model B through a store alias, as a rollout names it
    store = ModelStore(tmp_path / "store", "rides")
    promote(store, store.publish(models["b"]), "live")
    done = subprocess.run(
        [sys.executable, "-m", "stream_scorer", "model", "compare", str(models["a"]),
         f"store:{tmp_path / 'store'}/rides@live", "--config", str(CONFIG), "--input", str(path),
         "--out", str(tmp_path / "w.parquet"), "--top", "3"],
        capture_output=True, text=True, timeout=180, check=False, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["compared"] == 699
    assert report["delta"]["mean_abs"] > 0  # B is the store's version of model b, not a
    assert pq.read_table(tmp_path / "w.parquet").num_rows == 3
    missing = subprocess.run(
        [sys.executable, "-m", "stream_scorer", "model", "compare", str(models["a"]),
         str(tmp_path / "nope"), "--config", str(CONFIG), "--input", str(path)],
        capture_output=True, text=True, timeout=180, check=False, env=env,
    )  # fmt: skip
    assert missing.returncode == 2, missing.stderr
