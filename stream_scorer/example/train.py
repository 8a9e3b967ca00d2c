"""Train the example model: trip duration (regression) or "long trip" (binary) from rides.

The data are synthetic (``rides.py``); the model is saved as UBJSON with its manifest. The
training matrix comes from the worker's own feature builder (``model.pack.training_matrix``):
the records as the worker decodes them in, the matrix the worker scores out.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
import xgboost as xgb

from stream_scorer.contracts.manifest import (
    BINARY_OBJECTIVES,
    Manifest,
    sha256_file,
    write_manifest,
)
from stream_scorer.example.rides import (
    FEATURES,
    generate_columns,
    to_records,
    trip_duration_minutes,
)
from stream_scorer.model.pack import reference_of_matrix, training_matrix

LONG_TRIP_MINUTES = 20.0
MODEL_FILE = "model.ubj"


def _regression_metrics(
    y: npt.NDArray[np.float64], pred: npt.NDArray[np.float64]
) -> dict[str, float]:
    err = pred - y
    return {
        "rmse": round(float(np.sqrt(np.mean(err**2))), 4),
        "mae": round(float(np.mean(np.abs(err))), 4),
    }


def _binary_metrics(
    y: npt.NDArray[np.float64], prob: npt.NDArray[np.float64], threshold: float
) -> dict[str, float]:
    p = np.clip(prob, 1e-7, 1 - 1e-7)
    logloss = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    accuracy = np.mean((prob >= threshold) == (y == 1))
    return {"logloss": round(float(logloss), 4), "accuracy": round(float(accuracy), 4)}


def train(
    out_dir: Path,
    *,
    rows: int = 50_000,
    seed: int = 7,
    objective: str = "reg:squarederror",
    n_estimators: int = 100,
    max_depth: int = 6,
    threshold: float = 0.5,
) -> Manifest:
    """Train on synthetic rides and save ``model.ubj`` and ``manifest.json`` in ``out_dir``.

    Regression predicts the trip duration in minutes; ``binary:logistic`` predicts whether the
    trip takes longer than 20 minutes. Metrics compare the validation split (20%) against a
    constant baseline (the training mean).
    """
    cols = generate_columns(rows, seed)
    built = training_matrix(to_records(cols), FEATURES)  # exactly what the worker scores
    minutes = trip_duration_minutes(cols, np.random.default_rng(seed + 1))
    binary = objective in BINARY_OBJECTIVES
    y = (minutes > LONG_TRIP_MINUTES).astype(np.float64) if binary else minutes
    x, y = built.matrix[built.kept], y[built.kept]  # rows the worker would dead-letter: out
    rows = len(x)
    order = np.random.default_rng(seed + 2).permutation(rows)
    cut = int(rows * 0.8)
    train_idx, val_idx = order[:cut], order[cut:]
    names = [f.name for f in FEATURES]
    dtrain = xgb.DMatrix(x[train_idx], label=y[train_idx], feature_names=names)
    params = {
        "objective": objective,
        "max_depth": max_depth,
        "eta": 0.1,
        "nthread": 2,
        "seed": seed,
    }
    started = time.perf_counter()
    booster = xgb.train(params, dtrain, num_boost_round=n_estimators)
    train_s = time.perf_counter() - started
    pred = booster.inplace_predict(x[val_idx]).astype(np.float64)
    baseline = np.full(len(val_idx), float(np.mean(y[train_idx])))
    if binary:
        metrics = {
            "validation": _binary_metrics(y[val_idx], pred, threshold),
            "baseline": _binary_metrics(y[val_idx], baseline, threshold),
        }
    else:
        metrics = {
            "validation": _regression_metrics(y[val_idx], pred),
            "baseline": _regression_metrics(y[val_idx], baseline),
        }
    metrics["rows"] = {"train": len(train_idx), "validation": len(val_idx)}
    metrics["train_seconds"] = {"value": round(train_s, 2)}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / MODEL_FILE
    booster.save_model(str(path))
    digest = sha256_file(path)
    kind = "long-trip" if binary else "ride-duration"
    now = datetime.now(UTC)
    manifest = Manifest(
        model_version=f"{kind}-{now:%Y%m%d}-{digest[:8]}",
        model_file=MODEL_FILE,
        model_sha256=digest,
        objective=objective,
        features=FEATURES,
        xgboost_version=xgb.__version__,
        threshold=threshold,
        metrics=metrics,
        created_at=now.isoformat(timespec="seconds"),
        reference=reference_of_matrix(booster, FEATURES, x),  # drift: the training rows' bins
    )
    write_manifest(out_dir, manifest)
    return manifest
