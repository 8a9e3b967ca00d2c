"""Drift in the worker: each scored batch's bin counts into a sliding window, PSI now and then.

Per model (``DriftWatch``, labelled with the model's name) and version (``DriftMonitor``, built
from the version's reference bins, ``stages.drift.Bins``): every delivered batch's feature matrix
and predictions are binned (numpy, whole batch) and the counts pushed into ``DriftWindow``, a
ring of count arrays (one per batch, or a few small batches merged) whose running sum is the
window: no row is kept. Every ``drift.export_interval_s`` the window's PSI per feature, missing
share per feature, the predictions' PSI, the window's events and fill and the no-drift PSI
expected for it are set on the ``stream_scorer_drift_*`` gauges. A feature whose PSI passes
``drift.threshold`` is logged once until it falls back under it.

A model version without reference bins is scored without drift: one INFO line says so.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from stream_scorer.config import DriftConfig
from stream_scorer.contracts.manifest import Manifest
from stream_scorer.fast.kernel import drift_counts
from stream_scorer.stages.drift import Bins, Counts, bins_of, expected_psi, psi
from stream_scorer.worker.metrics import Metrics

log = logging.getLogger(__name__)

#: The window moves in steps of about 1/SLOTS of it: batches smaller than that are merged into
#: one slot, so the ring holds about SLOTS count arrays whatever the batch size.
SLOTS: Final = 50
#: The label value of the predictions' series in log lines (the gauge is a separate metric).
PREDICTION: Final = "__prediction__"


@dataclass
class _Slot:
    counts: Counts
    predictions: Counts
    events: int
    first: float
    last: float


class DriftWindow:
    """Bin counts of the last ``events`` scored events (or ``seconds``), summed as they slide.

    Each ``add`` is one batch's counts; the oldest slots drop out once the rest still fill the
    window (by events: it holds at least ``events``, up to one slot more; by time: every slot
    with an event in the last ``seconds``).
    """

    def __init__(self, shape: tuple[int, int], predictions: int, *, events: int, seconds: float):
        """An empty window of count arrays of ``shape`` and ``predictions`` bins."""
        self.size_events = events
        self.size_s = seconds
        self._ring: deque[_Slot] = deque()
        self.counts: Counts = np.zeros(shape, dtype=np.int64)
        self.predictions: Counts = np.zeros(predictions, dtype=np.int64)
        self.events = 0

    def add(self, counts: Counts, predictions: Counts, events: int, now: float) -> None:
        """Add one batch's counts (``events`` scored events at ``now``), then slide."""
        if events <= 0:
            return
        last = self._ring[-1] if self._ring else None
        small = last is not None and (
            now - last.first < self.size_s / SLOTS
            if self.size_s
            else last.events < self.size_events / SLOTS
        )
        if last is not None and small:
            last.counts += counts
            last.predictions += predictions
            last.events += events
            last.last = now
        else:
            self._ring.append(_Slot(counts.copy(), predictions.copy(), events, now, now))
        self.counts += counts
        self.predictions += predictions
        self.events += events
        self.slide(now)

    def slide(self, now: float) -> None:
        """Drop the slots that fell out of the window."""
        ring = self._ring
        while ring:
            oldest = ring[0]
            if self.size_s:
                if oldest.last >= now - self.size_s:
                    break
            elif self.events - oldest.events < self.size_events:
                break
            ring.popleft()
            self.counts -= oldest.counts
            self.predictions -= oldest.predictions
            self.events -= oldest.events

    def fill(self, now: float) -> float:
        """How full the window is, 0 to 1 (by events, or by the seconds its slots cover)."""
        if self.size_s:
            if not self._ring:
                return 0.0
            return min(1.0, (now - self._ring[0].first) / self.size_s)
        return min(1.0, self.events / self.size_events)

    @property
    def slots(self) -> int:
        """How many count arrays the ring holds."""
        return len(self._ring)


@dataclass(frozen=True)
class DriftReading:
    """One export of a window: PSI (NaN below ``min_events``) and missing share per feature."""

    psi: Mapping[str, float]
    missing: Mapping[str, float]
    prediction_psi: float
    events: int
    fill: float
    expected: float


def read_window(bins: Bins, window: DriftWindow, min_events: int, now: float) -> DriftReading:
    """PSI per feature and of the predictions, the missing shares, for the window now."""
    window.slide(now)
    n = window.events
    enough = n >= min_events
    feature_psi = psi(bins.reference, window.counts) if enough else np.full(len(bins.names), np.nan)
    missing = window.counts[np.arange(len(bins.names)), bins.sizes] / n if n else None
    pred = float(psi(bins.prediction_reference, window.predictions)) if enough else math.nan
    return DriftReading(
        psi=dict(zip(bins.names, feature_psi.tolist(), strict=True)),
        missing={
            name: (math.nan if missing is None else float(missing[i]))
            for i, name in enumerate(bins.names)
        },
        prediction_psi=pred,
        events=n,
        fill=window.fill(now),
        expected=expected_psi(bins.most_bins, bins.rows, n) if n else math.nan,
    )


def count_batch(bins: Bins, matrix: npt.NDArray[np.floating[Any]]) -> Counts:
    """``Bins.count``, compiled for the worker's float32 matrix (one pass, no temporaries)."""
    if matrix.dtype != np.float32:
        return bins.count(matrix)
    out = np.zeros((len(bins.names), bins.stride), dtype=np.int64)
    n_edges = np.count_nonzero(np.isfinite(bins.edges32), axis=1).astype(np.int64)
    drift_counts(matrix, bins.edges32, n_edges, bins.categorical, bins.sizes, out)
    return out


def warm_up_drift(bins: Bins) -> None:
    """Compile the drift counts' kernel for ``bins`` now (or load it from numba's cache)."""
    count_batch(bins, np.zeros((1, len(bins.names)), dtype=np.float32))


class DriftMonitor:
    """Drift of one model version (see the module doc)."""

    def __init__(
        self,
        model: str,
        version: str,
        bins: Bins,
        settings: DriftConfig,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Watch ``version`` of ``model`` against ``bins``; gauges in ``metrics``."""
        self.model, self.version, self.bins = model, version, bins
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self.window = DriftWindow(
            (len(bins.names), bins.stride),
            len(bins.prediction_reference),
            events=settings.window_events,
            seconds=settings.window_s,
        )
        self._next = clock() + settings.export_interval_s
        self._above: set[str] = set()
        self.last: DriftReading | None = None
        self.watched = tuple(n for n in bins.names if n not in settings.ignore)
        unknown = sorted(set(settings.ignore) - set(bins.names))
        if unknown:
            log.warning(
                "drift.ignore names %s, which model %s version %s does not have",
                ", ".join(unknown),
                model,
                version,
            )
        window = (
            f"the last {settings.window_s:g} s"
            if settings.window_s
            else f"the last {settings.window_events:,} events"
        )
        sized = settings.min_events if settings.window_s else settings.window_events
        log.info(
            "drift of model %s version %s: %d features against %s reference rows, window %s "
            "(PSI from %d events on), exported every %g s; threshold %g, and with no drift at "
            "all PSI is about %.4f at %d events (%d bins: (bins - 1) * (1/%d + 1/%d))",
            model,
            version,
            len(bins.names) - len(set(settings.ignore) & set(bins.names)),
            f"{bins.rows:,}",
            window,
            settings.min_events,
            settings.export_interval_s,
            settings.threshold,
            expected_psi(bins.most_bins, bins.rows, sized),
            sized,
            bins.most_bins,
            bins.rows,
            sized,
        )

    def observe(
        self, matrix: npt.NDArray[np.floating[Any]], predictions: npt.NDArray[np.floating[Any]]
    ) -> None:
        """Add a scored batch: its feature matrix and its predictions (row for row)."""
        now = self._clock()
        if len(matrix):
            self.window.add(
                count_batch(self.bins, matrix),
                self.bins.count_predictions(predictions),
                len(matrix),
                now,
            )
        if now >= self._next:
            self.export(now)

    def tick(self) -> None:
        """Export when the interval has passed (a time window slides without traffic)."""
        now = self._clock()
        if now >= self._next:
            self.export(now)

    def export(self, now: float | None = None) -> DriftReading:
        """Read the window and set the gauges."""
        now = self._clock() if now is None else now
        self._next = now + self._settings.export_interval_s
        reading = read_window(self.bins, self.window, self._settings.min_events, now)
        m, labels = self._metrics, (self.model, self.version)
        for name in self.watched:
            m.drift_psi.labels(*labels, name).set(reading.psi[name])
            m.drift_missing_share.labels(*labels, name).set(reading.missing[name])
        m.drift_prediction_psi.labels(*labels).set(reading.prediction_psi)
        m.drift_expected_psi.labels(*labels).set(reading.expected)
        m.drift_window_events.labels(*labels).set(reading.events)
        m.drift_window_fill.labels(*labels).set(reading.fill)
        watched = {n: reading.psi[n] for n in self.watched}
        self._warn({**watched, PREDICTION: reading.prediction_psi}, reading.events)
        self.last = reading
        return reading

    def _warn(self, values: Mapping[str, float], events: int) -> None:
        limit = self._settings.threshold
        for name, value in values.items():
            if value > limit and name not in self._above:
                self._above.add(name)
                log.warning(
                    "drift: model %s version %s, %s PSI %.3f > %g over the last %d events",
                    self.model,
                    self.version,
                    "predictions" if name == PREDICTION else f"feature {name}",
                    value,
                    limit,
                    events,
                )
            elif not value > limit and name in self._above:  # NaN re-arms too
                self._above.discard(name)
                log.info(
                    "drift: model %s version %s, %s PSI back to %.3f",
                    self.model,
                    self.version,
                    "predictions" if name == PREDICTION else f"feature {name}",
                    value,
                )

    def close(self) -> None:
        """Remove this version's series (its model was swapped out)."""
        m, labels = self._metrics, (self.model, self.version)
        for name in self.bins.names:
            for gauge in (m.drift_psi, m.drift_missing_share):
                with suppress(KeyError):
                    gauge.remove(*labels, name)
        for g in (
            m.drift_prediction_psi,
            m.drift_expected_psi,
            m.drift_window_events,
            m.drift_window_fill,
        ):
            with suppress(KeyError):
                g.remove(*labels)


class DriftWatch:
    """Drift of one model (its name: the ``model`` label) across its versions.

    Follows the version that scored each batch: a new version gets a new monitor (its own
    reference bins and window) and the previous one's series are removed.
    """

    def __init__(
        self,
        model: str,
        settings: DriftConfig,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Watch the model named ``model`` (``settings.enabled`` false: do nothing)."""
        self.model = model
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._version: str | None = None
        self.monitor: DriftMonitor | None = None

    def follow(self, manifest: Manifest) -> DriftMonitor | None:
        """The monitor of ``manifest``'s version (built on its first batch)."""
        if manifest.model_version == self._version:
            return self.monitor
        if self.monitor is not None:
            self.monitor.close()
        self._version, self.monitor = manifest.model_version, None
        if not self._settings.enabled:
            return None
        bins = bins_of(manifest.reference, manifest.features)
        if bins is None:
            log.info(
                "model %s version %s has no reference bins: scored without drift (pack it "
                "with `model pack --sample` or `--reference-topic`)",
                self.model,
                manifest.model_version,
            )
            return None
        self.monitor = DriftMonitor(
            self.model, manifest.model_version, bins, self._settings, self._metrics, self._clock
        )
        return self.monitor

    def observe(
        self,
        manifest: Manifest,
        matrix: npt.NDArray[np.floating[Any]] | None,
        predictions: npt.NDArray[np.floating[Any]] | None,
    ) -> None:
        """Add a batch scored by ``manifest``'s version (its feature matrix and predictions)."""
        monitor = self.follow(manifest)
        if monitor is None or matrix is None or predictions is None:
            return
        t0 = time.perf_counter()
        monitor.observe(matrix, predictions)
        self._metrics.observe_stage("drift", time.perf_counter() - t0)

    def tick(self) -> None:
        """Export on time without a batch (a time window slides without traffic)."""
        if self.monitor is not None:
            self.monitor.tick()
