"""What a running worker says while records flow: a progress line, and new category values.

Every ``logging.progress_interval_s`` (0: never) one INFO line: records per second since the
previous line, dead letters since then by reason, the lag of the assigned partitions and the
model version. The first time a ``category`` feature meets a value none of its categories, one
INFO line names the feature; later ones are only counted
(``stream_scorer_unseen_categories_total``). Both read what the metrics already count, once per
line or batch, never per record.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from stream_scorer.worker.metrics import Metrics

log = logging.getLogger(__name__)


def progress_line(
    records: int,
    seconds: float,
    dead_letters: Mapping[str, int],
    lag_records: int | None,
    model_version: str,
) -> str:
    """The progress line's text.

    Args:
        records: records consumed since the previous line.
        seconds: time since the previous line.
        dead_letters: dead letters since the previous line, by reason (zeros left out).
        lag_records: the assigned partitions' lag in records, or None when not known (no
            statistics yet, or ``kafka.statistics_interval_ms`` = 0).
        model_version: the model scoring now.
    """
    rate = records / seconds if seconds > 0 else 0.0
    dead = {r: n for r, n in sorted(dead_letters.items()) if n}
    dead_text = (
        f"{sum(dead.values())} ({', '.join(f'{r} {n}' for r, n in dead.items())})" if dead else "0"
    )
    lag = "unknown" if lag_records is None else f"{lag_records} records"
    return (
        f"progress: {records} records in {seconds:.0f} s ({rate:,.0f}/s), dead letters "
        f"{dead_text}, lag {lag}, model {model_version}"
    )


class Progress:
    """The worker's progress lines and first-unseen-category lines (see the module docstring)."""

    def __init__(self, metrics: Metrics, interval_s: float, now: float | None = None) -> None:
        """Start counting from ``now`` (``time.monotonic()`` when None); 0 turns lines off."""
        self._metrics = metrics
        self._interval = interval_s
        self._last = time.monotonic() if now is None else now
        self._records = self._consumed()
        self._dead = self._dead_letters()
        self._unseen_logged: set[str] = set()

    def _consumed(self) -> int:
        value = self._metrics.prometheus.get_sample_value("stream_scorer_records_consumed_total")
        return int(value or 0)

    def _dead_letters(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for metric in self._metrics.dead_letters.collect():
            for s in metric.samples:
                if s.name.endswith("_total"):
                    reason = s.labels["reason"]
                    out[reason] = out.get(reason, 0) + int(s.value)
        return out

    def _lag(self) -> int | None:
        samples = [
            s.value
            for metric in self._metrics.consumer_lag.collect()
            for s in metric.samples
            if s.value >= 0
        ]
        return int(sum(samples)) if samples else None

    def tick(self, model_version: str, now: float | None = None) -> None:
        """Log the progress line when an interval has passed since the previous one."""
        if self._interval <= 0:
            return
        now = time.monotonic() if now is None else now
        if now - self._last < self._interval:
            return
        records, dead = self._consumed(), self._dead_letters()
        since = {r: n - self._dead.get(r, 0) for r, n in dead.items()}
        log.info(
            "%s",
            progress_line(
                records - self._records, now - self._last, since, self._lag(), model_version
            ),
        )
        self._last, self._records, self._dead = now, records, dead

    def unseen(self, counts: Mapping[str, int], model_version: str) -> None:
        """Count a batch's unseen category values; log the first one of each feature."""
        self._metrics.count_unseen(counts)
        for feature, n in counts.items():
            if n and feature not in self._unseen_logged:
                self._unseen_logged.add(feature)
                log.info(
                    "feature %r met a value none of its categories for the first time (%d in "
                    "this batch, model %s); from now on they are only counted "
                    "(stream_scorer_unseen_categories_total)",
                    feature,
                    n,
                    model_version,
                    extra={"feature": feature},
                )
