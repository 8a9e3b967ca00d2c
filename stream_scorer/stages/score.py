"""Score: a float32 feature matrix to predictions, with the model named by a manifest.

Loading checks the model file against the manifest's sha256 and the booster's feature count
and names against the manifest, so a mismatched pair fails at start-up, not on the stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import xgboost as xgb

from stream_scorer.contracts.manifest import Manifest, read_manifest, sha256_file
from stream_scorer.errors import ModelError, ScoringError


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
        try:
            compare_features(booster, self.manifest.feature_names)
        except ModelError as exc:
            raise ModelError(f"model {path} and its manifest: {exc}") from None
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


def compare_features(booster: xgb.Booster, names: Sequence[str]) -> None:
    """Raise ``ModelError`` naming the first feature where booster and ``names`` differ.

    The count must match; so must the names, when the booster has any.
    """
    got = list(booster.feature_names or [])
    if got:
        for i, (have, want) in enumerate(zip(got, names, strict=False)):
            if have != want:
                where = f"the booster has {have!r}"
                if want in got:
                    where += f" (it has {want!r} at column {got.index(want)})"
                raise ModelError(
                    f"feature {want!r} (column {i}): {where}; list the features in the "
                    "booster's order"
                )
        extra = got[len(names) :]
        if extra:
            raise ModelError(f"feature {extra[0]!r}: the booster has it, the manifest does not")
        missing = list(names[len(got) :])
        if missing:
            raise ModelError(f"feature {missing[0]!r}: the manifest has it, the booster does not")
    elif booster.num_features() != len(names):
        raise ModelError(
            f"the booster expects {booster.num_features()} features, the manifest lists "
            f"{len(names)}"
        )


#: Rows of the warm-up batch a new version must score before it is swapped in.
WARM_UP_ROWS: Final = 64


def warm_up(scorer: Scorer, rows: int = WARM_UP_ROWS) -> None:
    """Score a reference batch (rows of zeros and of missing values) once.

    Raises:
        ModelError: the model fails on it or returns other than one finite value per row.
    """
    width = len(scorer.manifest.features)
    matrix = np.zeros((rows, width), dtype=np.float32)
    matrix[rows // 2 :] = np.nan
    try:
        values = scorer.predict(matrix).values
    except Exception as exc:
        raise ModelError(f"the warm-up batch failed: {exc}") from exc
    if values.shape != (rows,) or not np.isfinite(values).all():
        raise ModelError(
            f"the warm-up batch of {rows} rows gave {values.shape[0]} values or some not finite"
        )
