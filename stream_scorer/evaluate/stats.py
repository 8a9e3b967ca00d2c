"""The live metrics of one model version over one window, as mergeable counts.

Pure and bounded: a classifier's window keeps sums and two histograms of ``bins`` counts
(positives and negatives by predicted probability), whatever the number of outcomes; a
regressor's keeps four sums. ``summary()`` turns either into the metrics written to the
evaluation topic and exported to Prometheus.

Classifier metrics (``y`` the outcome, 0 or 1; ``p`` the predicted probability of class 1):

- log loss: mean of ``-(y ln p + (1 - y) ln(1 - p))``, ``p`` clipped to ``[1e-15, 1 - 1e-15]``;
- Brier score: mean of ``(p - y)²``;
- AUC: the histogram AUC, ``Σ_b pos_b (neg_below_b + neg_b / 2) / (P N)`` over ``bins``
  equal-width bins of ``[0, 1]``: pairs of a positive and a negative that share a bin count
  one half, so its error is at most ``auc_error_bound = Σ_b pos_b neg_b / (2 P N)``
  (docs/manual/watching.md; with 100 bins the error measured was under 3e-4);
- precision and recall of the prediction's ``label`` (1 when ``p`` reached the model's
  threshold): ``tp / (tp + fp)`` and ``tp / (tp + fn)``.

Regressor metrics (``e = prediction - y``): MAE (mean ``|e|``), RMSE (``sqrt(mean e²)``) and bias
(mean ``e``: positive when the model predicts too high).

A metric that needs something the window lacks (AUC without both classes, precision without a
predicted positive) is None.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Final

#: Probabilities are clipped to [EPS, 1 - EPS] in the log loss (sklearn's ``log_loss`` eps).
EPS: Final = 1e-15
#: The metric names of each task, in the evaluation record's order.
CLASSIFIER_METRICS: Final = ("log_loss", "brier", "auc", "precision", "recall")
REGRESSOR_METRICS: Final = ("mae", "rmse", "bias")
#: Metrics where a lower value is better (the others: higher is better).
LOWER_IS_BETTER: Final = frozenset({"log_loss", "brier", "mae", "rmse", "abs_bias"})


@dataclass
class ClassifierStats:
    """Counts of one classifier version's outcomes in a window."""

    bins: int
    n: int = 0
    positives: int = 0
    sum_log_loss: float = 0.0
    sum_brier: float = 0.0
    tp: int = 0
    fp: int = 0
    fn: int = 0
    pos_hist: list[int] = field(default_factory=list)
    neg_hist: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.bins < 1:
            raise ValueError(f"bins must be at least 1, got {self.bins}")
        self.pos_hist = self.pos_hist or [0] * self.bins
        self.neg_hist = self.neg_hist or [0] * self.bins

    def add(self, prediction: float, label: int | None, outcome: int) -> None:
        """Count one outcome (0 or 1) of a prediction (a probability) and its predicted label."""
        p = min(max(prediction, 0.0), 1.0)
        clipped = min(max(p, EPS), 1.0 - EPS)
        b = min(int(p * self.bins), self.bins - 1)
        self.n += 1
        if outcome:
            self.positives += 1
            self.sum_log_loss -= math.log(clipped)
            self.pos_hist[b] += 1
        else:
            self.sum_log_loss -= math.log(1.0 - clipped)
            self.neg_hist[b] += 1
        self.sum_brier += (p - outcome) ** 2
        said = (p >= 0.5) if label is None else bool(label)
        if said and outcome:
            self.tp += 1
        elif said:
            self.fp += 1
        elif outcome:
            self.fn += 1

    def auc(self) -> tuple[float | None, float | None]:
        """The histogram AUC and its error bound (None, None without both classes)."""
        pos, neg = self.positives, self.n - self.positives
        if pos == 0 or neg == 0:
            return None, None
        below = 0
        wins = 0.0
        ties = 0
        for p_b, n_b in zip(self.pos_hist, self.neg_hist, strict=True):
            wins += p_b * (below + 0.5 * n_b)
            ties += p_b * n_b
            below += n_b
        return wins / (pos * neg), 0.5 * ties / (pos * neg)

    def summary(self) -> dict[str, float | None]:
        """The window's metrics (``CLASSIFIER_METRICS``, plus ``auc_error_bound``)."""
        if self.n == 0:
            return dict.fromkeys((*CLASSIFIER_METRICS, "auc_error_bound"))
        auc, bound = self.auc()
        said = self.tp + self.fp
        real = self.tp + self.fn
        return {
            "log_loss": self.sum_log_loss / self.n,
            "brier": self.sum_brier / self.n,
            "auc": auc,
            "precision": self.tp / said if said else None,
            "recall": self.tp / real if real else None,
            "auc_error_bound": bound,
        }


@dataclass
class RegressorStats:
    """Sums of one regression version's errors in a window."""

    n: int = 0
    sum_abs: float = 0.0
    sum_sq: float = 0.0
    sum_err: float = 0.0

    def add(self, prediction: float, outcome: float) -> None:
        """Count one outcome of a predicted value."""
        e = prediction - outcome
        self.n += 1
        self.sum_abs += abs(e)
        self.sum_sq += e * e
        self.sum_err += e

    def summary(self) -> dict[str, float | None]:
        """The window's metrics (``REGRESSOR_METRICS``)."""
        if self.n == 0:
            return dict.fromkeys(REGRESSOR_METRICS)
        return {
            "mae": self.sum_abs / self.n,
            "rmse": math.sqrt(self.sum_sq / self.n),
            "bias": self.sum_err / self.n,
        }


Stats = ClassifierStats | RegressorStats
