"""Score: a float32 feature matrix to predictions, with the model named by a manifest.

Loading checks the model file against the manifest's sha256 and the booster's feature count
and names against the manifest, so a mismatched pair fails at start-up, not on the stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import xgboost as xgb

from stream_scorer.errors import ModelError, ScoringError
from stream_scorer.model.manifest import Manifest, read_manifest, sha256_file


@dataclass(frozen=True)
class Predictions:
    """Predictions for a batch.

    Attributes:
        values: the regression value or, for a binary classifier, the probability of class 1.
        labels: binary classifiers only: 1 where ``values >= threshold``, else 0.
    """

    values: npt.NDArray[np.float64]
    labels: npt.NDArray[np.int8] | None


class Scorer:
    """An XGBoost booster and its manifest."""

    def __init__(self, model_dir: Path, *, nthread: int = 1, threshold: float | None = None):
        """Load the model in ``model_dir``.

        Args:
            model_dir: directory with ``manifest.json`` and the model file it names.
            nthread: XGBoost threads for prediction.
            threshold: binary classifiers: overrides the manifest's threshold.

        Raises:
            ModelError: the manifest or model is missing, corrupt or inconsistent.
        """
        self.manifest: Manifest = read_manifest(model_dir)
        path = model_dir / self.manifest.model_file
        if not path.is_file():
            raise ModelError(f"model file {path} named by the manifest does not exist")
        digest = sha256_file(path)
        if digest != self.manifest.model_sha256:
            raise ModelError(
                f"model file {path} has sha256 {digest}, manifest says {self.manifest.model_sha256}"
            )
        try:
            booster = xgb.Booster(model_file=str(path))
        except xgb.core.XGBoostError as exc:
            raise ModelError(f"xgboost cannot load {path}: {exc}") from exc
        booster.set_param({"nthread": nthread})
        expected = self.manifest.feature_names
        if booster.num_features() != len(expected):
            raise ModelError(
                f"model expects {booster.num_features()} features, manifest lists {len(expected)}"
            )
        if booster.feature_names is not None and list(booster.feature_names) != expected:
            raise ModelError(
                f"model feature names {booster.feature_names} differ from the manifest's {expected}"
            )
        self._booster = booster
        self.threshold = self.manifest.threshold if threshold is None else threshold

    @property
    def model_version(self) -> str:
        """The manifest's model version, carried by every prediction."""
        return self.manifest.model_version

    def predict(self, matrix: npt.NDArray[np.float32]) -> Predictions:
        """Predict a batch (rows in the manifest's feature order; NaN = missing).

        Raises:
            ScoringError: XGBoost failed on the batch.
        """
        rows = matrix.shape[0]
        if rows == 0:
            values = np.empty(0, dtype=np.float64)
        else:
            try:
                raw = self._booster.inplace_predict(matrix, validate_features=False)
            except xgb.core.XGBoostError as exc:
                raise ScoringError(f"xgboost failed on a batch of {rows}: {exc}") from exc
            values = np.asarray(raw, dtype=np.float64).reshape(-1)
        if values.shape[0] != rows:
            raise ScoringError(f"model returned {values.shape[0]} values for {rows} rows")
        if not self.manifest.is_binary:
            return Predictions(values, None)
        return Predictions(values, (values >= self.threshold).astype(np.int8))
