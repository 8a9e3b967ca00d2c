"""The evaluator's Prometheus metrics: live metrics per model version, join counters.

Label count bounded: the ``version`` label takes at most ``evaluate.max_versions`` values at a
time; when another version comes, the least recently seen one's series are removed.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from stream_scorer.evaluate.stats import CLASSIFIER_METRICS, REGRESSOR_METRICS

_PREFIX = "stream_scorer_evaluation_"
_VERSIONED = ("model", "version")


class EvaluationMetrics:
    """Every metric ``stream-scorer evaluate`` serves, in its own registry."""

    def __init__(
        self, model: str, max_versions: int = 8, prometheus: CollectorRegistry | None = None
    ) -> None:
        """Create the metrics in ``prometheus`` (default: a new registry)."""
        self.prometheus = prometheus or CollectorRegistry()
        self.model = model
        self.max_versions = max_versions
        self._versions: OrderedDict[str, None] = OrderedDict()
        reg = self.prometheus
        self.live = {
            name: Gauge(
                f"{_PREFIX}{name}",
                f"Live {name.replace('_', ' ')} of the version's last closed window",
                _VERSIONED,
                registry=reg,
            )
            for name in (*CLASSIFIER_METRICS, *REGRESSOR_METRICS)
        }
        self.window_outcomes = Gauge(
            f"{_PREFIX}window_outcomes",
            "Outcomes joined in the version's last closed window (what its metrics rest on)",
            _VERSIONED,
            registry=reg,
        )
        self.prediction_psi = Gauge(
            f"{_PREFIX}prediction_psi",
            "PSI of the version's predictions in its last closed window against the prediction "
            "reference packed with it (evaluate.decide.max_prediction_psi)",
            _VERSIONED,
            registry=reg,
        )
        self.joined = Counter(
            f"{_PREFIX}joined",
            "Predictions joined with their outcome (counted in a window)",
            _VERSIONED,
            registry=reg,
        )
        self.unlabelled = Counter(
            f"{_PREFIX}unlabelled",
            "Predictions whose horizon passed without an outcome",
            _VERSIONED,
            registry=reg,
        )
        self.unmatched = Counter(
            f"{_PREFIX}unmatched_outcomes",
            "Outcomes whose horizon passed without a prediction",
            registry=reg,
        )
        self.late = Counter(
            f"{_PREFIX}late_outcomes",
            "Outcomes that came after their prediction's horizon (not joined)",
            registry=reg,
        )
        self.dropped = Counter(
            f"{_PREFIX}dropped",
            "Records dropped from the full join state (oldest first), by kind",
            ("kind",),
            registry=reg,
        )
        self.invalid = Counter(
            f"{_PREFIX}invalid",
            "Records the evaluator could not read (skipped), by kind",
            ("kind",),
            registry=reg,
        )
        self.pending = Gauge(
            f"{_PREFIX}pending",
            "Records waiting in the join state, by kind",
            ("kind",),
            registry=reg,
        )
        self.windows = Counter(f"{_PREFIX}windows", "Windows closed and written", registry=reg)
        self.decisions = Counter(
            f"{_PREFIX}decisions",
            "Canary decisions taken (evaluate --decide), by action",
            ("action",),
            registry=reg,
        )
        for kind in ("prediction", "outcome"):
            self.dropped.labels(kind)
            self.invalid.labels(kind)
            self.pending.labels(kind)

    def touch(self, version: str) -> None:
        """Mark ``version`` seen; forget the least recently seen beyond ``max_versions``."""
        self._versions.pop(version, None)
        self._versions[version] = None
        while len(self._versions) > self.max_versions:
            old, _ = self._versions.popitem(last=False)
            for metric in (
                *self.live.values(),
                self.window_outcomes,
                self.prediction_psi,
                self.joined,
                self.unlabelled,
            ):
                with contextlib.suppress(KeyError):  # never set for this version
                    metric.remove(self.model, old)

    def versions(self) -> list[str]:
        """The versions exported now, least recently seen first."""
        return list(self._versions)

    def observe_window(
        self,
        version: str,
        n: int,
        summary: Mapping[str, float | None],
        prediction_psi: float | None = None,
    ) -> None:
        """Export one version's closed window (its predictions' PSI when there is one)."""
        self.touch(version)
        if prediction_psi is not None:
            self.prediction_psi.labels(self.model, version).set(prediction_psi)
        self.window_outcomes.labels(self.model, version).set(n)
        self.joined.labels(self.model, version).inc(n)
        for name, value in summary.items():
            if name in self.live and value is not None:
                self.live[name].labels(self.model, version).set(value)

    def render(self) -> bytes:
        """The exposition text."""
        return generate_latest(self.prometheus)
